"""Liveness, readiness and Prometheus metrics over HTTP for the hosting platform.

`/livez`   200 while the event loop answers (a blocked loop is the failure that matters).
`/readyz`  200 when the database answers, the Realtime subscription is live, the engine role's
           self-check passes and the database accepts its broadcasts, else 503 with the
           reason; a listener that is not ready still catches up by polling (unless its
           self-check fails: then it claims nothing), so platforms should alert on it
           rather than restart it.
`/metrics` Prometheus text format; the database's refusal counters are re-read at each scrape
           (planner_engine.refusal_counts, within REFRESH_TIMEOUT_S, else the last values).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ReadyProbe = Callable[[], Awaitable[dict[str, Any]]]
#: Re-reads what /metrics serves from the database (the refusal counters); best effort.
MetricsRefresh = Callable[[], Awaitable[None]]
#: How long a scrape waits for that refresh before serving the last values.
REFRESH_TIMEOUT_S = 2.0
#: The readiness report's fields that must all be true for a 200.
READY_WHEN = ("database", "realtime", "self_check", "broadcast")


def make_app(ready: ReadyProbe, refresh: MetricsRefresh | None = None) -> web.Application:
    async def livez(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        report = await ready()
        ok = all(report.get(k) is True for k in READY_WHEN)
        return web.json_response(report, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        if refresh is not None:
            try:
                await asyncio.wait_for(refresh(), REFRESH_TIMEOUT_S)
            except Exception as exc:  # a scrape must not fail because the database is away
                logger.debug("metrics refresh failed: {}", exc)
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(
    ready: ReadyProbe, host: str, port: int, refresh: MetricsRefresh | None = None,
) -> web.AppRunner:
    runner = web.AppRunner(make_app(ready, refresh), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
