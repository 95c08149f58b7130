"""Invariants 2-5: what a user may request, the rate limits, the lifecycle, cancellation."""

from __future__ import annotations

import asyncio
import itertools

import asyncpg
import pytest

from tests.db.conftest import (
    World,
    as_user,
    claim,
    expect_sqlstate,
    insert_run,
    new_allocation_run,
    new_org,
    request_run,
)
from tests.support.roles import acting_as

STATUSES = ["PENDING", "GENERATING", "COMPLETED", "INFEASIBLE", "FAILED", "CANCELLED"]
TERMINAL = {"COMPLETED", "INFEASIBLE", "FAILED", "CANCELLED"}
LEGAL = {
    ("PENDING", "GENERATING"), ("GENERATING", "PENDING"),
    ("GENERATING", "COMPLETED"), ("GENERATING", "INFEASIBLE"), ("GENERATING", "FAILED"),
    ("GENERATING", "CANCELLED"), ("PENDING", "CANCELLED"), ("PENDING", "FAILED"),
}


async def fresh_ar(su: asyncpg.Connection, world: World) -> str:
    ar, _ = await new_allocation_run(su, world.a.id, n_terms=1)
    return ar


# -- user inserts (invariant 3) --------------------------------------------------------------
async def test_user_insert_is_forced_to_a_clean_pending_run(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    run = await request_run(pg, world.a, allocation_run_id=ar, constraints=["VIC_PGY1"])
    row = await su.fetchrow("select * from allocation_planner_runs where id = $1", run)
    assert row["status"] == "PENDING"
    assert str(row["requested_by"]) == world.a.planner
    assert row["attempts"] == 0 and row["max_attempts"] == 3
    assert row["lease"] is None and row["worker_id"] is None and row["heartbeat_at"] is None
    assert row["constraints"] == ["VIC_PGY1"]


async def test_requested_by_and_created_at_cannot_be_faked(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    rows = await as_user(
        pg, world.a.admin,
        "insert into allocation_planner_runs (organization_id, allocation_run_id, n_job_lines,"
        " requested_by, created_at) values ($1, $2, 3, $3, now() - interval '1 day')"
        " returning requested_by::text, created_at > now() - interval '1 minute'",
        world.a.id, ar, world.a.viewer,
    )
    assert rows[0][0] == world.a.admin and rows[0][1] is True


@pytest.mark.parametrize("column,value", [
    ("status", "'COMPLETED'"), ("status", "'GENERATING'"), ("lease", "gen_random_uuid()"),
    ("heartbeat_at", "now()"), ("claimed_at", "now()"), ("finished_at", "now()"),
    ("attempts", "1"), ("worker_id", "'me'"), ("result_metadata", "'{}'::jsonb"),
    ("error", "'x'"), ("cancel_requested_at", "now()"),
])
async def test_user_cannot_write_engine_fields(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World, column: str, value: str
):
    ar = await fresh_ar(su, world)
    async with expect_sqlstate("PL015"):
        await as_user(
            pg, world.a.planner,
            f"insert into allocation_planner_runs (organization_id, allocation_run_id,"
            f" n_job_lines, {column}) values ($1, $2, 1, {value})", world.a.id, ar)


async def test_only_planners_and_admins_of_the_org_may_request(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    for sub in (world.a.viewer, world.b.planner, world.b.admin, world.outsider):
        async with expect_sqlstate("PL012"):
            await request_run(pg, world.a, allocation_run_id=ar, sub=sub)
    # anon: no grant at all
    async with expect_sqlstate("42501"), acting_as(pg, "anon") as c:
        await c.execute("insert into allocation_planner_runs (organization_id,"
                        " allocation_run_id, n_job_lines) values ($1, $2, 1)",
                        world.a.id, ar)


async def test_allocation_run_must_be_the_orgs(pg: asyncpg.Connection, world: World):
    async with expect_sqlstate("PL012"):
        await request_run(pg, world.a, allocation_run_id=world.b.allocation_run_id)


async def test_unknown_rule_set_codes_are_refused(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    try:
        await request_run(pg, world.a, allocation_run_id=ar,
                          constraints=["VIC_PGY1", "NO_SUCH_RULE", "vic_pgy1"])
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "PL010"
        assert "NO_SUCH_RULE" in str(exc) and "vic_pgy1" in str(exc)
        assert "AMC_PGY1" in (exc.hint or "")
    else:
        raise AssertionError("unknown codes accepted")
    # the service role gets the same answer: the catalogue is not a suggestion
    async with expect_sqlstate("PL010"):
        await insert_run(su, world.a.id, ar, constraints=["NOPE"])


@pytest.mark.parametrize("n", [0, -1, 501, 10_000])
async def test_n_job_lines_out_of_range(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World, n: int
):
    ar = await fresh_ar(su, world)
    async with expect_sqlstate("PL011", "23514"):
        await request_run(pg, world.a, allocation_run_id=ar, n_job_lines=n)


async def test_max_job_lines_is_configurable(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    await request_run(pg, world.a, allocation_run_id=ar, n_job_lines=500)
    await su.execute("update planner_engine.limits set max_job_lines = 10"
                     " where organization_id = $1", world.a.id)
    try:
        ar2 = await fresh_ar(su, world)
        async with expect_sqlstate("PL011"):
            await request_run(pg, world.a, allocation_run_id=ar2, n_job_lines=11)
    finally:
        await su.execute("update planner_engine.limits set max_job_lines = null"
                         " where organization_id = $1", world.a.id)


# -- rate limits (invariant 4) ---------------------------------------------------------------
async def test_one_active_run_per_allocation_run(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    first = await request_run(pg, world.a, allocation_run_id=ar)
    async with expect_sqlstate("PL013"):
        await request_run(pg, world.a, allocation_run_id=ar)
    await claim(su, first)  # GENERATING is active too
    async with expect_sqlstate("PL013"):
        await request_run(pg, world.a, allocation_run_id=ar)
    # the index holds for privileged writers as well
    async with expect_sqlstate("PL013", "23505"):
        await insert_run(su, world.a.id, ar)
    await su.execute("update allocation_planner_runs set status = 'CANCELLED',"
                     " finished_at = now(), lease = null where id = $1", first)
    await request_run(pg, world.a, allocation_run_id=ar)


async def test_simultaneous_requests_yield_exactly_one_run(
    su: asyncpg.Connection, db_url: str, world: World
):
    ar = await fresh_ar(su, world)
    conns = [await asyncpg.connect(db_url) for _ in range(6)]
    try:
        results = await asyncio.gather(
            *(request_run(c, world.a, allocation_run_id=ar) for c in conns),
            return_exceptions=True)
    finally:
        for c in conns:
            await c.close()
    ok = [r for r in results if isinstance(r, str)]
    errors = [r for r in results if not isinstance(r, str)]
    assert len(ok) == 1
    assert all(isinstance(e, asyncpg.PostgresError) and e.sqlstate == "PL013" for e in errors)


async def test_hourly_limit_per_organisation(pg: asyncpg.Connection, su: asyncpg.Connection):
    org = await new_org(su, "Rate Limited", runs_per_hour=None)  # default: 30
    ars = [(await new_allocation_run(su, org.id, n_terms=1))[0] for _ in range(31)]
    for ar in ars[:30]:
        run = await request_run(pg, org, allocation_run_id=ar)
        await su.execute("update allocation_planner_runs set status = 'CANCELLED',"
                         " finished_at = now() where id = $1", run)
    try:
        await request_run(pg, org, allocation_run_id=ars[30])
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "PL014" and "limit 30" in str(exc)
    else:
        raise AssertionError("31st run in an hour accepted")
    # per-organisation override
    await su.execute("insert into planner_engine.limits (organization_id, runs_per_hour)"
                     " values ($1, 31)", org.id)
    await request_run(pg, org, allocation_run_id=ars[30])
    # runs older than an hour no longer count (the ledger's time, not the run's, counts)
    await su.execute("update planner_engine.limits set runs_per_hour = 2"
                     " where organization_id = $1", org.id)
    await su.execute("update planner_private.usage_ledger set at = now() - interval '61 minutes'"
                     " where organization_id = $1", org.id)
    await su.execute("update allocation_planner_runs set status = 'CANCELLED',"
                     " finished_at = now() where organization_id = $1 and status = 'PENDING'",
                     org.id)
    await request_run(pg, org, allocation_run_id=ars[0])


async def test_members_cannot_raise_their_own_limit(pg: asyncpg.Connection, world: World):
    async with expect_sqlstate("42501"):
        await as_user(pg, world.a.admin,
                      "update planner_engine.limits set runs_per_hour = 1000000"
                      " where organization_id = $1", world.a.id)


# -- lifecycle (invariant 2) -----------------------------------------------------------------
def _fields_for(status: str) -> dict[str, object]:
    """Engine fields consistent with `status` (so only the trigger can object)."""
    if status == "GENERATING":
        return {"lease": "gen_random_uuid()", "heartbeat_at": "now()", "finished_at": "null"}
    if status in TERMINAL:
        return {"lease": "null", "finished_at": "now()"}
    return {"lease": "null", "finished_at": "null"}


async def _run_in(su: asyncpg.Connection, world: World, status: str) -> str:
    ar = await fresh_ar(su, world)
    run = await insert_run(su, world.a.id, ar)
    if status == "PENDING":
        return run
    await su.execute("update allocation_planner_runs set status = 'GENERATING',"
                     " lease = gen_random_uuid(), heartbeat_at = now() where id = $1", run)
    if status != "GENERATING":
        await su.execute(f"update allocation_planner_runs set status = '{status}', lease = null,"
                         " finished_at = now() where id = $1", run)
    return run


@pytest.mark.parametrize("old,new", [
    (o, n) for o, n in itertools.product(STATUSES, STATUSES) if o != n
])
async def test_transitions(su: asyncpg.Connection, world: World, old: str, new: str):
    run = await _run_in(su, world, old)
    sets = ", ".join(f"{k} = {v}" for k, v in _fields_for(new).items())
    sql = f"update allocation_planner_runs set status = '{new}', {sets} where id = $1"
    if (old, new) in LEGAL:
        await su.execute(sql, run)
        assert await su.fetchval("select status from allocation_planner_runs where id = $1",
                                 run) == new
    else:
        async with expect_sqlstate("PL003"):
            await su.execute(sql, run)  # even the superuser


async def test_runs_cannot_change_organisation(su: asyncpg.Connection, world: World):
    run = await insert_run(su, world.b.id, world.b.allocation_run_id)
    async with expect_sqlstate("PL002", "23503"):
        await su.execute("update allocation_planner_runs set organization_id = $1,"
                         " allocation_run_id = $2 where id = $3",
                         world.a.id, world.a.allocation_run_id, run)


# -- users never write engine state (invariant 5) ----------------------------------------------
@pytest.mark.parametrize("sql", [
    "update allocation_planner_runs set status = 'CANCELLED' where id = $1",
    "update allocation_planner_runs set lease = null where id = $1",
    "update allocation_planner_runs set heartbeat_at = now() where id = $1",
    "update allocation_planner_runs set result_metadata = '{}' where id = $1",
    "delete from allocation_planner_runs where id = $1",
    "select planner_engine.finish_run($1, gen_random_uuid(), 'FAILED')",
    "select planner_engine.heartbeat($1, gen_random_uuid())",
    "select planner_engine.claim_run('me', $1)",
    "select planner_engine.sweep_stale_runs() where $1::uuid is not null",
])
async def test_users_cannot_touch_engine_state(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World, sql: str
):
    ar = await fresh_ar(su, world)
    run = await request_run(pg, world.a, allocation_run_id=ar)
    for sub in (world.a.planner, world.a.admin):
        async with expect_sqlstate("42501"):
            await as_user(pg, sub, sql, run)


async def test_request_cancel_pending_cancels_at_once(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    run = await request_run(pg, world.a, allocation_run_id=ar)
    await as_user(pg, world.a.planner, "select public.request_cancel($1)", run)
    row = await su.fetchrow("select * from allocation_planner_runs where id = $1", run)
    assert row["status"] == "CANCELLED" and row["finished_at"] is not None
    # idempotent on a finished run
    await as_user(pg, world.a.planner, "select public.request_cancel($1)", run)
    assert await su.fetchval(
        "select count(*) from planner_execution_logs where planner_run_id = $1", run) == 1


async def test_request_cancel_generating_asks_the_engine(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    run = await request_run(pg, world.a, allocation_run_id=ar)
    c = await claim(engine, run)
    assert c is not None
    hb = await engine.fetchrow("select * from planner_engine.heartbeat($1, $2)", run, c["lease"])
    assert (hb["lease_held"], hb["cancel_requested"]) == (True, False)
    await as_user(pg, world.a.admin, "select public.request_cancel($1)", run)
    assert await su.fetchval("select status from allocation_planner_runs where id = $1",
                             run) == "GENERATING"
    hb = await engine.fetchrow("select * from planner_engine.heartbeat($1, $2)", run, c["lease"])
    assert (hb["lease_held"], hb["cancel_requested"]) == (True, True)
    # a graceful re-queue of a run the user wants stopped cancels it instead
    await engine.execute("select planner_engine.finish_run($1, $2, 'PENDING')", run, c["lease"])
    assert await su.fetchval("select status from allocation_planner_runs where id = $1",
                             run) == "CANCELLED"


async def test_request_cancel_needs_planner_of_the_org(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    run = await request_run(pg, world.a, allocation_run_id=ar)
    for sub in (world.a.viewer, world.b.planner, world.b.admin, world.outsider):
        async with expect_sqlstate("PL012"):
            await as_user(pg, sub, "select public.request_cancel($1)", run)
    async with expect_sqlstate("42501"), acting_as(pg, "anon") as c:
        await c.execute("select public.request_cancel($1)", run)
    assert await su.fetchval("select status from allocation_planner_runs where id = $1",
                             run) == "PENDING"


async def test_duplicate_rule_set_codes_are_dropped(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar = await fresh_ar(su, world)
    run = await request_run(pg, world.a, allocation_run_id=ar,
                            constraints=["NO_NIGHTS", "VIC_PGY1", "NO_NIGHTS"])
    assert await su.fetchval("select constraints from allocation_planner_runs where id = $1",
                             run) == ["NO_NIGHTS", "VIC_PGY1"]
