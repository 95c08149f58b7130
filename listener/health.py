"""Liveness, readiness and Prometheus metrics over HTTP for the hosting platform.

`/livez`   200 while the event loop answers (a blocked loop is the failure that matters).
`/readyz`  200 when the database answers, the Realtime subscription is live, the engine role's
           self-check passes and the database accepts its broadcasts, else 503 with the
           reason; a listener that is not ready still catches up by polling (unless its
           self-check fails: then it claims nothing), so platforms should alert on it
           rather than restart it.
`/metrics` Prometheus text format.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

ReadyProbe = Callable[[], Awaitable[dict[str, Any]]]
#: The readiness report's fields that must all be true for a 200.
READY_WHEN = ("database", "realtime", "self_check", "broadcast")


def make_app(ready: ReadyProbe) -> web.Application:
    async def livez(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        report = await ready()
        ok = all(report.get(k) is True for k in READY_WHEN)
        return web.json_response(report, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def serve(ready: ReadyProbe, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(make_app(ready), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
