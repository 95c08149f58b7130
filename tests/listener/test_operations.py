"""Operational behaviour: run logs through a database hiccup, health and metrics, and a
graceful shutdown that lets a short solve finish."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
import uuid

import asyncpg
import pytest
from loguru import logger

from devstack.seed import SeededOrganization
from listener import metrics
from listener.db import EngineDB
from listener.logs import RunLogSink
from tests.listener.conftest import ListenerFactory
from tests.support.harness import TERMINAL, insert_run, run_row, until, wait_for_status


async def _pending_run(db: asyncpg.Connection, org: SeededOrganization) -> str:
    return await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                            allocation_run_id=org.allocation_run_id,
                            n_job_lines=org.suggested_n_job_lines,
                            constraints=org.suggested_constraints, options={})


async def test_run_logs_survive_a_database_hiccup_and_drops_are_counted(
    db: asyncpg.Connection, engine_url: str, orgs: list[SeededOrganization],
):
    org = orgs[7]
    run_id = await _pending_run(db, org)
    engine = await EngineDB.connect(engine_url)
    claimed = await engine.claim("log-test", uuid.UUID(run_id))  # log lines need the lease
    assert claimed is not None
    bound = {"planner_run_id": run_id, "organization_id": org.id,
             "planner_lease": str(claimed.lease)}
    sink = RunLogSink(capacity=8, batch=3)
    sink.install("INFO")
    dropped_before = metrics.LOG_RECORDS_DROPPED._value.get()
    try:
        with logger.contextualize(**bound):
            for i in range(5):
                logger.info("before the hiccup {}", i)
        logger.info("no run bound: never written to the run log")
        assert sink.pending() == 5
        # The hiccup: the engine may not write logs in this database for a moment.
        await db.execute("revoke execute on function planner_engine.write_logs(jsonb)"
                         " from planner_engine")
        assert await sink.flush(engine) is False
        assert sink.pending() == 5, "records are kept through the outage"
        with logger.contextualize(**bound):
            for i in range(5):
                logger.warning("during the hiccup {}", i)
        assert sink.pending() == 8 and sink.dropped == 2, "bounded: oldest dropped, counted"
        assert metrics.LOG_RECORDS_DROPPED._value.get() - dropped_before == 2
        await db.execute("grant execute on function planner_engine.write_logs(jsonb)"
                         " to planner_engine")
        # The pool's connections are also cut: the sink retries on fresh ones.
        cut = await db.fetch("select pid from pg_stat_activity where usename = 'planner_engine'"
                             " and datname = current_database()")
        assert cut, "the engine's pool has connections to cut"
        await db.execute("select pg_terminate_backend(pid) from pg_stat_activity"
                         " where pid = any($1::int[])", [r["pid"] for r in cut])

        async def cut_backends_gone() -> bool | None:  # terminate only signals them
            left = await db.fetchval("select count(*) from pg_stat_activity"
                                     " where pid = any($1::int[])", [r["pid"] for r in cut])
            return True if left == 0 else None

        await until(cut_backends_gone, 10, "terminated engine backends still running")
        ok = await sink.flush(engine)
        if not ok:  # the first call on a cut connection fails; the next one reconnects
            ok = await sink.flush(engine)
        assert ok and sink.pending() == 0
        rows = await db.fetch("select level, message from planner_execution_logs"
                              " where planner_run_id = $1 order by id", run_id)
    finally:
        sink.uninstall()
        await engine.close()
        # The run only carried the logs: take it out of later tests' queues.
        await db.execute("select planner_engine.finish_run($1, $2, 'CANCELLED')",
                         uuid.UUID(run_id), claimed.lease)
    messages = [r["message"] for r in rows]
    assert messages == [f"before the hiccup {i}" for i in range(2, 5)] + [
        f"during the hiccup {i}" for i in range(5)
    ]
    assert {r["level"] for r in rows} == {"INFO", "WARNING"}
    assert not any("no run bound" in m for m in messages)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_lets_a_short_solve_finish_then_exits_zero(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
    sig: signal.Signals,
):
    org = orgs[8] if sig == signal.SIGTERM else orgs[9]
    proc = listeners("L1", PLANNER_SHUTDOWN_GRACE_S=20)
    await proc.wait_ready()
    base = f"http://127.0.0.1:{proc.health_port}"
    assert (await asyncio.to_thread(_get, base + "/livez"))[0] == 200
    run_id = await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                              allocation_run_id=org.allocation_run_id,
                              n_job_lines=org.suggested_n_job_lines,
                              constraints=org.suggested_constraints,
                              options={"time_limit_seconds": 3})
    await wait_for_status(db, run_id, {"GENERATING"}, 30)
    proc.signal(sig)
    assert await proc.wait(timeout_s=30) == 0, proc.log()
    row = await run_row(db, run_id)
    assert row["status"] == "COMPLETED" and row["worker_id"] == "L1", row
    assert any("no new runs will be claimed" in r.get("message", "") for r in proc.records())
    # Nothing this listener owned is left GENERATING.
    left = await db.fetchval("select count(*) from allocation_planner_runs"
                             " where status = 'GENERATING' and worker_id = 'L1'")
    assert left == 0


async def test_health_and_metrics(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
):
    org = orgs[10]
    proc = listeners("L1")
    await proc.wait_ready()
    base = f"http://127.0.0.1:{proc.health_port}"
    status, body = await asyncio.to_thread(_get, base + "/readyz")
    assert status == 200 and '"realtime": true' in body and '"database": true' in body
    run_id = await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                              allocation_run_id=org.allocation_run_id,
                              n_job_lines=org.suggested_n_job_lines,
                              constraints=org.suggested_constraints,
                              options={"time_limit_seconds": 1})
    assert (await wait_for_status(db, run_id, TERMINAL, 60))["status"] == "COMPLETED"
    # The counter moves just after the row's final write: wait for it, bounded.
    completed = 'planner_runs_total{outcome="COMPLETED"} 1.0'
    deadline = time.monotonic() + 10
    status, text = await asyncio.to_thread(_get, base + "/metrics")
    while completed not in text and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        status, text = await asyncio.to_thread(_get, base + "/metrics")
    assert status == 200
    assert completed in text
    for name in ("planner_queue_depth", "planner_solve_seconds_bucket",
                 "planner_run_overhead_seconds_count", "planner_realtime_reconnects_total",
                 "planner_log_records_dropped_total", "planner_broadcasts_total"):
        assert name in text
    assert str(uuid.UUID(run_id))  # the run id is a real UUID
