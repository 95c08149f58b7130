"""Regression (found by the campaign's burst scenario): a slow Realtime broadcast endpoint must
not stretch the window in which a claimed run has no heartbeat.

The listener used to *await* its "loading" and "solving" status broadcasts between claiming a
run and starting the heartbeat (and "writing" after the last heartbeat, before the commit). A
broadcast waits up to 3 s for Realtime; when Realtime was slow (the 100-run burst flooded the
local server with queue-position broadcasts) a live listener went 6+ s without a heartbeat, the
sweeper at a short TTL re-queued its run, and runs ended FAILED after max_attempts. Here a real
HTTP server that never answers stands in for a hung Realtime; the run must keep a fresh
heartbeat from claim to completion. (Since issue 14 the events go through the database,
planner_engine.broadcast, not Realtime's REST API; they are still sent without being awaited,
and a hung Realtime must still cost nothing but the wake-ups.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiohttp import web

from devstack.seed import SeededOrganization
from devstack.settings import DevSettings
from tests.support.harness import ListenerProcess, insert_run, listener_env
from tests.support.realtime import free_port

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def hung_realtime() -> AsyncIterator[str]:
    """Accepts every request and never answers (until the test ends)."""
    stop = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        with contextlib.suppress(asyncio.CancelledError):
            await stop.wait()
        return web.Response(status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hang)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    stop.set()
    await runner.cleanup()


async def test_heartbeat_covers_the_whole_run_when_realtime_hangs(
    db: asyncpg.Connection, orgs: list[SeededOrganization], dev_settings: DevSettings,
    db_name: str, hung_realtime: str, tmp_path: Path,
) -> None:
    a = orgs[1]
    env = listener_env(dev_settings, db_name, hung_realtime)
    proc = ListenerProcess(env, tmp_path / "slow.log", worker_id="slow-bc").start()
    try:
        run = await insert_run(db, user_id=a.planner.id, organization_id=a.id,
                               allocation_run_id=a.allocation_run_id,
                               n_job_lines=a.suggested_n_job_lines,
                               constraints=a.suggested_constraints,
                               options={"time_limit_seconds": 3})
        worst = 0.0
        status = "PENDING"
        deadline = asyncio.get_running_loop().time() + 90
        while status not in ("COMPLETED", "FAILED", "INFEASIBLE", "CANCELLED"):
            assert asyncio.get_running_loop().time() < deadline, proc.log()
            row = await db.fetchrow(
                "select status, extract(epoch from clock_timestamp() - heartbeat_at)::float8"
                " as gap from allocation_planner_runs where id = $1", run)
            assert row is not None
            status = row["status"]
            if status == "GENERATING":
                worst = max(worst, row["gap"])
            await asyncio.sleep(0.1)
        assert status == "COMPLETED", proc.log()
        # Heartbeat every 1 s; the claim itself counts as one. Two awaited 3 s broadcast
        # timeouts before the first heartbeat made this 6-7 s.
        assert worst < 3.0, f"{worst:.1f}s without a heartbeat while Realtime hung"
    finally:
        proc.stop_now()
