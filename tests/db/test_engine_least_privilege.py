"""Issue 14, finding 3: the engine credential cannot be turned against tenants.

A thief holding the listener's database login (`planner_engine`), or a member of any
organisation, tries what worked before: read a run's lease and use it, read every tenant's
inputs, fail every PENDING run with a zero timeout, and write back-dated log lines into any
run. Each test failed on the code before this change and passes now.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg

from tests.db.conftest import World, claim, expect_sqlstate, insert_run, new_allocation_run
from tests.support.roles import acting_as


async def fresh_run(su: asyncpg.Connection, world: World) -> str:
    ar, _ = await new_allocation_run(su, world.a.id, n_terms=2, teams=world.a.teams)
    return await insert_run(su, world.a.id, ar)


async def status(su: asyncpg.Connection, run: str) -> str:
    return str(await su.fetchval("select status from allocation_planner_runs where id = $1", run))


# -- the lease is a secret of its holder -----------------------------------------------------
async def test_the_lease_a_member_reads_fences_nothing(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    """A viewer of A (or any Realtime subscriber) reads `lease` of A's running run; handed to
    the engine credential it heartbeats, loads and finishes nothing. The holder's lease works."""
    run = await fresh_run(su, world)
    c = await claim(engine, run, worker="holder")
    assert c is not None
    async with acting_as(pg, "authenticated", sub=world.a.viewer) as conn:
        read = await conn.fetchval("select lease from allocation_planner_runs where id = $1", run)
    assert read is not None and read != c["lease"]

    beat = await engine.fetchrow("select * from planner_engine.heartbeat($1, $2)", run, read)
    assert beat["lease_held"] is False
    async with expect_sqlstate("PL001"):
        await engine.fetchval("select planner_engine.load_problem($1, $2)", run, read)
    async with expect_sqlstate("PL001"):
        await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED', 'stolen')",
                             run, read)
    assert await status(su, run) == "GENERATING"
    # the holder is unaffected
    beat = await engine.fetchrow("select * from planner_engine.heartbeat($1, $2)", run, c["lease"])
    assert beat["lease_held"] is True
    await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED', 'mine')",
                         run, c["lease"])
    assert await status(su, run) == "FAILED"


async def test_nobody_can_read_released_leases(
    pg: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    async with expect_sqlstate("42501"):
        await engine.fetch("select * from planner_private.released_leases")
    for sub in (world.a.admin, world.a.viewer):
        async with expect_sqlstate("42501"), acting_as(pg, "authenticated", sub=sub) as conn:
            await conn.fetch("select * from planner_private.released_leases")


# -- the engine reads tenant data only through functions that check the lease ---------------
async def test_the_engine_reads_no_tenant_table(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    for table in ("organizations", "allocation_runs", "terms", "teams", "team_demand",
                  "allocation_planner_runs"):
        async with expect_sqlstate("42501"):
            await engine.fetchval(f"select count(*) from public.{table}")


async def test_the_catch_up_scan_sees_pending_ids_and_ages_only(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    pending = await fresh_run(su, world)
    running = await fresh_run(su, world)
    assert await claim(engine, running) is not None
    rows = await engine.fetch("select * from planner_engine.pending_runs(1000)")
    assert rows and all(list(r.keys()) == ["id", "created_at"] for r in rows)
    ids = [str(r["id"]) for r in rows]
    assert pending in ids and running not in ids
    assert [r["created_at"] for r in rows] == sorted(r["created_at"] for r in rows)
    assert len(await engine.fetch("select * from planner_engine.pending_runs(0)")) == 0


# -- the sweeper's timeouts are the operator's ------------------------------------------------
async def test_the_engine_cannot_fail_every_pending_run_at_once(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    run = await fresh_run(su, world)
    async with expect_sqlstate("42883", "42501"):
        await engine.fetchval("select planner_engine.sweep_stale_runs('0 seconds', '0 seconds')")
    async with expect_sqlstate("42501"):
        await engine.fetchval("select planner_private.sweep_stale_runs('0 seconds', '0 seconds')")
    assert await engine.fetchval("select planner_engine.sweep_stale_runs()") == 0
    assert await status(su, run) == "PENDING"
    # The operator's settings decide: a short pending timeout (set as superuser) applies.
    await su.execute("update allocation_planner_runs set created_at = now() - interval"
                     " '2 minutes' where id = $1", run)
    await su.execute("update planner_engine.settings set pending_run_ttl = '1 minute'")
    try:
        assert await engine.fetchval("select planner_engine.sweep_stale_runs()") >= 1
    finally:
        await su.execute("update planner_engine.settings set pending_run_ttl = default")
    assert await status(su, run) == "FAILED"


# -- log writes are fenced by the lease, timestamps set by the database ------------------------
async def log_lines(su: asyncpg.Connection, run: str) -> list[asyncpg.Record]:
    return list(await su.fetch(
        "select message, level, logged_at, organization_id::text from planner_execution_logs"
        " where planner_run_id = $1 and context ->> 'event' is null order by id", run))


async def write(engine: asyncpg.Connection, **record: object) -> int:
    return int(await engine.fetchval("select planner_engine.write_logs($1)",
                                     json.dumps([{"level": "INFO", **record}])))


async def test_log_lines_need_the_lease_and_get_the_database_time(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    run = await fresh_run(su, world)
    other = await fresh_run(su, world)
    c = await claim(engine, run)
    c_other = await claim(engine, other)
    assert c is not None and c_other is not None
    column = await su.fetchval("select lease::text from allocation_planner_runs where id = $1", run)
    # no lease, a forged one, the column's value, another run's lease: nothing is written
    assert await write(engine, planner_run_id=run, organization_id=world.a.id,
                       level="CRITICAL", message="no lease") == 0
    assert await write(engine, planner_run_id=run, lease=str(uuid_of(1)), message="forged") == 0
    assert await write(engine, planner_run_id=run, lease=column, message="read") == 0
    assert await write(engine, planner_run_id=run, lease=str(c_other["lease"]),
                       message="other run's") == 0
    # the holder's line lands, stamped by the database whatever it claimed
    before = await su.fetchval("select now()")
    assert await write(engine, planner_run_id=run, lease=str(c["lease"]), level="CRITICAL",
                       message="back-dated", logged_at="2020-01-01T00:00:00Z") == 1
    lines = await log_lines(su, run)
    assert [r["message"] for r in lines] == ["back-dated"]
    assert lines[0]["logged_at"] >= before - timedelta(seconds=1)
    assert lines[0]["logged_at"] > datetime(2026, 1, 1, tzinfo=UTC)


async def test_the_last_lease_may_log_for_a_grace_period_after_the_run_ended(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    run = await fresh_run(su, world)
    c = await claim(engine, run)
    assert c is not None
    lease = str(c["lease"])
    # re-queued (a deploy): the listener's final lines, flushed after finish_run, still land
    await engine.execute("select planner_engine.finish_run($1, $2, 'PENDING')", run, lease)
    assert await write(engine, planner_run_id=run, lease=lease, message="after the end") == 1
    # a new claim's lease replaces it: the old one writes nothing, even within its grace
    c2 = await claim(engine, run, worker="w2")
    assert c2 is not None
    assert await write(engine, planner_run_id=run, lease=lease, message="zombie") == 0
    lease2 = str(c2["lease"])
    assert await write(engine, planner_run_id=run, lease=lease2, message="new") == 1
    # the run ends; its last lease logs within the grace period and not after it
    await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED', 'done')",
                         run, lease2)
    assert await write(engine, planner_run_id=run, lease=lease2, message="final") == 1
    await su.execute("update planner_private.released_leases set released_at = now()"
                     " - (select log_grace from planner_engine.settings) - interval '1 second'"
                     " where run_id = $1", run)
    assert await write(engine, planner_run_id=run, lease=lease2, message="too late") == 0
    assert [r["message"] for r in await log_lines(su, run)] == ["after the end", "new", "final"]


def uuid_of(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012d}"
