"""The engine's side: claim, heartbeat, load, fenced commit/finish, logs, sweeper, restore."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
import pytest

from devstack.settings import DevSettings
from tests.db.conftest import (
    World,
    as_user,
    claim,
    current_plan,
    expect_sqlstate,
    insert_run,
    new_allocation_run,
    plan_json,
    request_run,
)
from tests.support.roles import acting_as


async def fresh(su: asyncpg.Connection, world: World, n_terms: int = 3) -> tuple[str, list[str]]:
    return await new_allocation_run(su, world.a.id, n_terms=n_terms, teams=world.a.teams)


async def status_of(su: asyncpg.Connection, run: str) -> asyncpg.Record:
    return await su.fetchrow("select * from allocation_planner_runs where id = $1", run)


async def wait_until_blocked(su: asyncpg.Connection, conn: asyncpg.Connection) -> None:
    """Until `conn`'s backend waits on a lock (so the race is really a race)."""
    pid = conn.get_server_pid()
    for _ in range(200):
        if await su.fetchval("select wait_event_type = 'Lock' from pg_stat_activity"
                             " where pid = $1", pid):
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the second transaction never blocked")


# -- claim -------------------------------------------------------------------------------------
async def test_claim_oldest_first_and_specific(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    # Nothing else may be pending for "oldest first" to be observable: use old timestamps.
    runs = []
    for minutes in (3, 2, 1):
        ar, _ = await fresh(su, world)
        runs.append(await insert_run(su, world.a.id, ar))
        await su.execute("update allocation_planner_runs set created_at = now() - $2::interval"
                         " where id = $1", runs[-1], timedelta(minutes=minutes + 1000))
    c = await claim(engine, runs[2], worker="w-specific")
    assert c is not None and str(c["id"]) == runs[2]
    c = await claim(engine, worker="w-any")
    assert c is not None and str(c["id"]) == runs[0]
    assert c["status"] == "GENERATING" and c["attempts"] == 1 and c["worker_id"] == "w-any"
    assert c["lease"] is not None and c["claimed_at"] is not None
    assert c["heartbeat_at"] is not None
    # a GENERATING run cannot be claimed again
    assert await claim(engine, runs[2]) is None
    # clean up: the rest of the module does not want leftovers in the queue
    for r in runs:
        await su.execute("update allocation_planner_runs set status = 'CANCELLED',"
                         " lease = null, finished_at = now() where id = $1", r)


async def test_claim_returns_nothing_when_queue_is_empty(engine: asyncpg.Connection,
                                                         world: World):
    assert await claim(engine, "00000000-0000-0000-0000-000000000000") is None


async def test_claim_fails_runs_at_max_attempts_and_moves_on(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    ar1, _ = await fresh(su, world)
    ar2, _ = await fresh(su, world)
    poison = await insert_run(su, world.a.id, ar1, attempts=3, max_attempts=3)
    await su.execute("update allocation_planner_runs set created_at = now() - interval '9 days'"
                     " where id = $1", poison)
    good = await insert_run(su, world.a.id, ar2)
    c = await claim(engine)
    assert c is not None and str(c["id"]) == good
    row = await status_of(su, poison)
    assert row["status"] == "FAILED" and "3 attempts" in row["error"]
    assert await su.fetchval("select message from planner_execution_logs where"
                             " planner_run_id = $1", poison) is not None
    # asked for by id: failed and nothing returned
    ar3, _ = await fresh(su, world)
    poison2 = await insert_run(su, world.a.id, ar3, attempts=5, max_attempts=5)
    assert await claim(engine, poison2) is None
    assert (await status_of(su, poison2))["status"] == "FAILED"
    await su.execute("update allocation_planner_runs set status = 'CANCELLED', lease = null,"
                     " finished_at = now() where id = $1", good)


async def test_concurrent_claims_never_hand_out_a_run_twice(
    su: asyncpg.Connection, world: World,
    connect: Callable[..., Awaitable[asyncpg.Connection]],
):
    runs = set()
    for _ in range(30):
        ar, _ = await fresh(su, world, n_terms=1)
        runs.add(await insert_run(su, world.a.id, ar))
    conns = [await connect() for _ in range(8)]

    async def worker(i: int, conn: asyncpg.Connection) -> list[str]:
        got = []
        while True:
            row = await claim(conn, worker=f"w{i}")
            if row is None:
                return got
            got.append(str(row["id"]))

    try:
        results = await asyncio.gather(*(worker(i, c) for i, c in enumerate(conns)))
    finally:
        for c in conns:
            await c.close()
    claimed = [r for got in results for r in got]
    assert len(claimed) == len(set(claimed)) == len(runs)
    assert set(claimed) == runs
    assert sum(1 for got in results if got) > 1  # really concurrent
    rows = await su.fetch("select attempts, worker_id from allocation_planner_runs"
                          " where id = any($1::uuid[])", list(runs))
    assert all(r["attempts"] == 1 for r in rows)
    await su.execute("update allocation_planner_runs set status = 'CANCELLED', lease = null,"
                     " finished_at = now() where id = any($1::uuid[])", list(runs))


# -- heartbeat, load_problem ---------------------------------------------------------------------
async def test_heartbeat_reports_lease(su: asyncpg.Connection, engine: asyncpg.Connection,
                                       world: World):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    await su.execute("update allocation_planner_runs set heartbeat_at = now() - interval '1 min'"
                     " where id = $1", run)
    rows = await engine.fetch("select * from planner_engine.heartbeat($1, $2)", run, c["lease"])
    assert [tuple(r) for r in rows] == [(True, False)]
    assert (await status_of(su, run))["heartbeat_at"] > c["heartbeat_at"]
    rows = await engine.fetch("select * from planner_engine.heartbeat($1, gen_random_uuid())", run)
    assert [tuple(r) for r in rows] == [(False, False)]
    rows = await engine.fetch("select * from planner_engine.heartbeat(gen_random_uuid(), $1)",
                              c["lease"])
    assert [tuple(r) for r in rows] == [(False, False)]


async def test_load_problem(su: asyncpg.Connection, engine: asyncpg.Connection, world: World):
    from solver.problem import Problem

    a = world.a
    ar, terms = await fresh(su, world, n_terms=5)  # VIC_PGY1 is a 5-term year
    run = await insert_run(su, a.id, ar, constraints=["VIC_PGY1"], n_job_lines=4)
    c = await claim(engine, run)
    assert c is not None
    async with expect_sqlstate("PL001"):
        await engine.fetchval("select planner_engine.load_problem($1, gen_random_uuid())", run)
    problem = json.loads(await engine.fetchval(
        "select planner_engine.load_problem($1, $2)::text", run, c["lease"]))
    assert [t["id"] for t in problem["terms"]] == terms
    assert {t["id"] for t in problem["teams"]} == set(a.teams)
    assert len(problem["demand"]) == len(terms) * len(a.teams)
    assert problem["n_job_lines"] == 4 and problem["rule_sets"] == ["VIC_PGY1"]
    assert problem["previous_plan"] is None and problem["options"] == {}
    # A team without a site has "site": null, as the solver's model says (no '' stand-in).
    sites = {t["id"]: t["site"] for t in problem["teams"]}
    assert sites[a.teams[2]] is None and all(sites[t] for t in a.teams if t != a.teams[2])
    Problem.model_validate(problem)  # the solver's strict model accepts it as is
    # with a plan: previous_plan carries lines, rotations and pins
    await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')", run,
                         c["lease"], a.id, plan_json(a, terms, pinned={1: [terms[0]]}))
    run2 = await insert_run(su, a.id, ar)
    c2 = await claim(engine, run2)
    assert c2 is not None
    problem = json.loads(await engine.fetchval(
        "select planner_engine.load_problem($1, $2)::text", run2, c2["lease"]))
    assert problem["previous_plan"] == json.loads(plan_json(a, terms, pinned={1: [terms[0]]}))
    Problem.model_validate(problem)
    await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED', 'test')",
                         run2, c2["lease"])


# -- commit / finish -----------------------------------------------------------------------------
async def test_commit_plan_writes_lines_and_completes(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    a = world.a
    ar, terms = await fresh(su, world)
    run = await insert_run(su, a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    snap = await engine.fetchval("select planner_engine.commit_plan($1, $2, $3, $4, $5)",
                                 run, c["lease"], a.id, plan_json(a, terms, 3),
                                 json.dumps({"objective": 7}))
    assert snap is None  # nothing to snapshot the first time
    row = await status_of(su, run)
    assert row["status"] == "COMPLETED" and row["lease"] is None
    assert row["finished_at"] is not None and json.loads(row["result_metadata"]) == {"objective": 7}
    assert await su.fetchval("select count(*) from rotations where allocation_run_id = $1",
                             ar) == 3 * len(terms)
    assert await su.fetchval("select count(distinct planner_run_id) from job_lines"
                             " where allocation_run_id = $1 and planner_run_id = $2", ar, run) == 1
    # the lease is gone: a second commit is fenced off
    async with expect_sqlstate("PL001"):
        await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                             run, c["lease"], a.id, plan_json(a, terms))


@pytest.mark.parametrize("plan", [
    "null", "{}", '{"lines": {}}', '{"lines": [1]}', '{"lines": [{"line": 0, "rotations": {}}]}',
    '{"lines": [{"line": 1}]}', '{"lines": [{"line": 1, "rotations": {"x": "y"}}]}',
])
async def test_commit_plan_refuses_malformed_plans(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World, plan: str
):
    a = world.a
    ar, _ = await fresh(su, world)
    run = await insert_run(su, a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    async with expect_sqlstate("PL004"):
        await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4::jsonb, '{}')",
                             run, c["lease"], a.id, None if plan == "null" else plan)
    await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED')", run, c["lease"])


async def test_commit_plan_refuses_incomplete_or_duplicate_lines(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    a = world.a
    ar, terms = await fresh(su, world)
    run = await insert_run(su, a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    incomplete = json.loads(plan_json(a, terms))
    del incomplete["lines"][0]["rotations"][terms[1]]
    dup = json.loads(plan_json(a, terms))
    dup["lines"][1]["line"] = 1
    pin_without_rotation = json.loads(plan_json(a, terms))
    pin_without_rotation["lines"][0]["pinned"] = [a.teams[0]]
    for bad in (incomplete, dup, pin_without_rotation):
        async with expect_sqlstate("PL004"):
            await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                                 run, c["lease"], a.id, json.dumps(bad))
    await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED')", run, c["lease"])


async def test_fenced_commit_after_sweeper_requeued_writes_nothing(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    a = world.a
    ar, terms = await fresh(su, world)
    first = await insert_run(su, a.id, ar)
    c0 = await claim(engine, first)
    assert c0 is not None
    await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                         first, c0["lease"], a.id, plan_json(a, terms))
    before = await current_plan(su, ar)
    n_history = await su.fetchval("select count(*) from job_lines_history")

    run = await insert_run(su, a.id, ar)
    zombie = await claim(engine, run, worker="zombie")
    assert zombie is not None
    await su.execute("update allocation_planner_runs set heartbeat_at = now() - interval '5 min'"
                     " where id = $1", run)
    assert await su.fetchval("select planner_engine.sweep_stale_runs()") == 1
    assert (await status_of(su, run))["status"] == "PENDING"
    try:
        await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                             run, zombie["lease"], a.id, plan_json(a, terms, offset=2))
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "PL001" and "lease lost" in str(exc)
        assert exc.hint and "sweeper" in exc.hint
    else:
        raise AssertionError("zombie commit accepted")
    assert await current_plan(su, ar) == before
    assert await su.fetchval("select count(*) from job_lines_history") == n_history
    row = await status_of(su, run)
    assert row["status"] == "PENDING" and row["result_metadata"] is None
    # re-claimed by another worker: the zombie's lease still does not work, the new one does
    fresh_claim = await claim(engine, run, worker="healthy")
    assert fresh_claim is not None and fresh_claim["attempts"] == 2
    empty = "'{\"lines\": []}'"
    for sql in ("select planner_engine.finish_run($1, $2, 'FAILED')",
                f"select planner_engine.commit_plan($1, $2, '{a.id}', {empty}, '{{}}')"):
        async with expect_sqlstate("PL001"):
            await engine.execute(sql, run, zombie["lease"])
    hb = await engine.fetchrow("select * from planner_engine.heartbeat($1, $2)",
                               run, zombie["lease"])
    assert hb["lease_held"] is False
    snap = await engine.fetchval("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                                 run, fresh_claim["lease"], a.id, plan_json(a, terms, offset=2))
    assert snap is not None


@pytest.mark.parametrize("status", ["FAILED", "INFEASIBLE", "CANCELLED"])
async def test_finish_run_terminal(su: asyncpg.Connection, engine: asyncpg.Connection,
                                   world: World, status: str):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    await engine.execute("select planner_engine.finish_run($1, $2, $3, $4, $5)", run,
                         c["lease"], status, "why", json.dumps({"unsat_core": ["x"]}))
    row = await status_of(su, run)
    assert row["status"] == status and row["error"] == "why" and row["lease"] is None
    assert row["finished_at"] is not None and json.loads(row["result_metadata"])
    async with expect_sqlstate("PL001"):
        await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED')", run,
                             c["lease"])


async def test_finish_run_requeue_gives_the_attempt_back(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    c = await claim(engine, run)
    assert c is not None and c["attempts"] == 1
    await engine.execute("select planner_engine.finish_run($1, $2, 'PENDING', 'SIGTERM')",
                         run, c["lease"])
    row = await status_of(su, run)
    assert (row["status"], row["attempts"], row["lease"], row["worker_id"]) == \
        ("PENDING", 0, None, None)
    async with expect_sqlstate("22023"):
        c = await claim(engine, run)
        assert c is not None
        await engine.execute("select planner_engine.finish_run($1, $2, 'COMPLETED')",
                             run, c["lease"])


# -- logs ----------------------------------------------------------------------------------------
async def test_write_log_and_write_logs(su: asyncpg.Connection, engine: asyncpg.Connection,
                                        world: World):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    lease = str(c["lease"])
    records = [
        {"planner_run_id": run, "lease": lease, "level": "warning", "message": "solver slow",
         "context": {"s": 1}, "traceback": "Traceback..."},
    ] + [
        {"planner_run_id": run, "lease": lease, "level": "INFO",
         "message": f"m{i}", "context": {"i": i}, "traceback": None,
         "logged_at": "2026-01-01T00:00:01Z"} for i in range(5)
    ] + [
        {"planner_run_id": run, "level": "INFO", "message": "no lease"},
        {"planner_run_id": run, "lease": "not-a-uuid", "message": "x"},
        {"planner_run_id": "not-a-uuid", "lease": lease, "message": "x"},
        {"planner_run_id": run, "lease": lease, "organization_id": world.b.id,
         "level": "NOTICE", "message": "n"},
    ]
    assert await engine.fetchval("select planner_engine.write_logs($1)", json.dumps(records)) == 7
    rows = await su.fetch("select level, message, context, traceback, organization_id::text,"
                          " logged_at > now() - interval '1 minute' as stamped_now"
                          " from planner_execution_logs where planner_run_id = $1 order by id",
                          run)
    assert rows[0]["level"] == "WARNING" and rows[0]["traceback"] == "Traceback..."
    assert [r["message"] for r in rows[1:]] == ["m0", "m1", "m2", "m3", "m4", "n"]
    assert rows[-1]["level"] == "INFO" and json.loads(rows[-1]["context"]) == {"level": "NOTICE"}
    # the organisation is the run's and the time the database's, whatever the record said
    assert {r["organization_id"] for r in rows} == {world.a.id}
    assert all(r["stamped_now"] for r in rows)


# -- sweeper -------------------------------------------------------------------------------------
async def test_sweeper_requeues_then_fails_stale_runs(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar, max_attempts=2)
    for attempt, expected in ((1, "PENDING"), (2, "FAILED")):
        c = await claim(engine, run, worker=f"w{attempt}")
        assert c is not None and c["attempts"] == attempt
        # fresh heartbeat: untouched
        assert await su.fetchval("select planner_engine.sweep_stale_runs()") == 0
        await su.execute("update allocation_planner_runs set heartbeat_at = now() - interval"
                         " '91 seconds' where id = $1", run)
        assert await su.fetchval("select planner_engine.sweep_stale_runs()") == 1
        row = await status_of(su, run)
        assert row["status"] == expected and row["lease"] is None
        log = await su.fetchrow("select * from planner_execution_logs where planner_run_id = $1"
                                " order by id desc limit 1", run)
        assert log["message"].startswith("Timeout") and f"w{attempt}" in log["message"]
        ctx = json.loads(log["context"])
        assert ctx["new_status"] == expected and ctx["last_heartbeat_at"]
    assert (await status_of(su, run))["finished_at"] is not None
    # idempotent
    assert await su.fetchval("select planner_engine.sweep_stale_runs()") == 0


async def test_sweeper_ttl_parameters(su: asyncpg.Connection, engine: asyncpg.Connection,
                                      world: World):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    await su.execute("update allocation_planner_runs set heartbeat_at = now() - interval"
                     " '20 seconds' where id = $1", run)
    assert await engine.fetchval("select planner_engine.sweep_stale_runs()") == 0
    assert (await status_of(su, run))["status"] == "GENERATING"
    # The timeouts are the operator's (settings), not the caller's.
    await su.execute("update planner_engine.settings set stale_run_ttl = '10 seconds'")
    try:
        assert await engine.fetchval("select planner_engine.sweep_stale_runs()") >= 1
    finally:
        await su.execute("update planner_engine.settings set stale_run_ttl = default")
    assert (await status_of(su, run))["status"] == "PENDING"
    # A superuser (an operator, a test) may still sweep once with other timeouts.
    await su.execute("update allocation_planner_runs set status = 'GENERATING',"
                     " lease = gen_random_uuid(), heartbeat_at = now() - interval '20 seconds'"
                     " where id = $1", run)
    assert await su.fetchval("select planner_private.sweep_stale_runs('10 seconds')") >= 1
    assert (await status_of(su, run))["status"] == "PENDING"


async def test_sweeper_fails_runs_nobody_picked_up(su: asyncpg.Connection, world: World):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    await su.execute("update allocation_planner_runs set created_at = now() - interval"
                     " '29 minutes' where id = $1", run)
    assert await su.fetchval("select planner_engine.sweep_stale_runs()") == 0
    await su.execute("update allocation_planner_runs set created_at = now() - interval"
                     " '31 minutes' where id = $1", run)
    assert await su.fetchval("select planner_engine.sweep_stale_runs()") == 1
    row = await status_of(su, run)
    assert row["status"] == "FAILED" and "no planner picked this run up" in row["error"]
    msg = await su.fetchval("select message from planner_execution_logs where planner_run_id = $1",
                            run)
    assert msg.startswith("Timeout: no planner picked this run up")


async def test_sweeper_cancels_a_stale_run_whose_cancel_was_requested(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    ar, _ = await fresh(su, world)
    run = await request_run(pg, world.a, allocation_run_id=ar)
    assert await claim(engine, run) is not None
    await as_user(pg, world.a.planner, "select public.request_cancel($1)", run)
    await su.execute("update allocation_planner_runs set heartbeat_at = now() - interval"
                     " '5 minutes' where id = $1", run)
    assert await su.fetchval("select planner_engine.sweep_stale_runs()") == 1
    assert (await status_of(su, run))["status"] == "CANCELLED"


async def test_heartbeat_committed_first_wins_over_sweeper(
    su: asyncpg.Connection, world: World,
    connect: Callable[..., Awaitable[asyncpg.Connection]],
):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    hb_conn, sweep_conn = await connect(), await connect()
    try:
        c = await claim(hb_conn, run)
        assert c is not None
        await su.execute("update allocation_planner_runs set heartbeat_at = now() - interval"
                         " '5 minutes' where id = $1", run)
        tr = hb_conn.transaction()
        await tr.start()
        row = await hb_conn.fetchrow("select * from planner_engine.heartbeat($1, $2)",
                                     run, c["lease"])
        assert row["lease_held"] is True
        # The sweeper saw a stale row in its snapshot and now waits for the heartbeat's lock.
        sweep = asyncio.create_task(sweep_conn.fetchval("select planner_engine.sweep_stale_runs()"))
        await wait_until_blocked(su, sweep_conn)
        await tr.commit()
        assert await sweep == 0  # re-checked on the new row version: not stale any more
    finally:
        await hb_conn.close()
        await sweep_conn.close()
    row = await status_of(su, run)
    digest = await su.fetchval("select planner_private.lease_digest($1)", c["lease"])
    assert row["status"] == "GENERATING" and row["lease"] == digest


async def test_sweeper_committed_first_wins_over_heartbeat(
    su: asyncpg.Connection, world: World,
    connect: Callable[..., Awaitable[asyncpg.Connection]],
):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    hb_conn, sweep_conn = await connect(), await connect()
    try:
        c = await claim(hb_conn, run)
        assert c is not None
        await su.execute("update allocation_planner_runs set heartbeat_at = now() - interval"
                         " '5 minutes' where id = $1", run)
        tr = sweep_conn.transaction()
        await tr.start()
        assert await sweep_conn.fetchval("select planner_engine.sweep_stale_runs()") == 1
        hb = asyncio.create_task(hb_conn.fetchrow(
            "select * from planner_engine.heartbeat($1, $2)", run, c["lease"]))
        await wait_until_blocked(su, hb_conn)
        await tr.commit()
        row = await hb
        assert row["lease_held"] is False  # the worker learns it must stop
    finally:
        await hb_conn.close()
        await sweep_conn.close()
    row = await status_of(su, run)
    assert row["status"] == "PENDING" and row["lease"] is None


async def test_concurrent_sweepers_do_not_double_log(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World,
    connect: Callable[..., Awaitable[asyncpg.Connection]],
):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    assert await claim(engine, run) is not None
    await su.execute("update allocation_planner_runs set heartbeat_at = now() - interval"
                     " '5 minutes' where id = $1", run)
    conns = [await connect() for _ in range(4)]
    try:
        counts = await asyncio.gather(
            *(c.fetchval("select planner_engine.sweep_stale_runs()") for c in conns))
    finally:
        for c in conns:
            await c.close()
    assert sum(counts) >= 1
    assert await su.fetchval("select count(*) from planner_execution_logs where"
                             " planner_run_id = $1", run) == 1


async def test_sweeper_cron_job_exists_in_dev_stack(dev_settings: DevSettings):
    """pg_cron lives in the dev stack's `postgres` database only; the clones have no cron."""
    conn = await asyncpg.connect(dev_settings.dsn())
    try:
        job = await conn.fetchrow(
            "select schedule, command, database, active from cron.job"
            " where jobname = 'planner-sweep-stale-runs'")
    finally:
        await conn.close()
    assert job is not None
    assert job["schedule"] == "* * * * *" and job["active"]
    assert "planner_engine.sweep_stale_runs()" in job["command"]
    assert job["database"] == dev_settings.database


# -- snapshot / restore ----------------------------------------------------------------------
async def test_snapshot_regenerate_restore_returns_exactly_the_old_plan(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    a = world.a
    ar, terms = await fresh(su, world)

    async def generate(offset: int, pinned: dict[int, list[str]] | None = None) -> str | None:
        run = await request_run(pg, a, allocation_run_id=ar, n_job_lines=4)
        c = await claim(engine, run)
        assert c is not None
        snap = await engine.fetchval("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                                     run, c["lease"], a.id,
                                     plan_json(a, terms, 4, offset=offset, pinned=pinned))
        return None if snap is None else str(snap)

    assert await generate(0, {2: [terms[1]]}) is None
    # a manager's tweak: change a team and pin it
    await as_user(pg, a.planner,
                  "update rotations r set team_id = $1, pinned = true from job_lines l"
                  " where r.job_line_id = l.id and l.allocation_run_id = $2"
                  " and l.line_number = 3 and r.term_id = $3", a.teams[-1], ar, terms[2])
    edited = await current_plan(su, ar)
    assert edited["lines"][2]["pinned"] == [terms[2]]

    snap = await generate(1)
    assert snap is not None
    regenerated = await current_plan(su, ar)
    assert regenerated != edited
    stored = json.loads(await su.fetchval(
        "select plan::text from job_lines_history where id = $1", snap))
    assert [{k: v for k, v in line.items() if k != "planner_run_id"}
            for line in stored["lines"]] == edited["lines"]

    undo = (await as_user(pg, a.planner, "select public.restore_job_lines($1)::text", snap))[0][0]
    assert await current_plan(su, ar) == edited  # exactly, pins included
    assert undo is not None and undo != snap
    # the restore is itself undoable
    await as_user(pg, a.admin, "select public.restore_job_lines($1)", undo)
    assert await current_plan(su, ar) == regenerated
    history = await su.fetch("select planner_run_id, restored_snapshot_id from job_lines_history"
                             " where allocation_run_id = $1 order by taken_at, id", ar)
    assert len(history) == 3


async def test_restore_is_refused_while_a_run_is_active_and_across_orgs(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    a = world.a
    ar, terms = await fresh(su, world)
    for offset in (0, 1):
        run = await insert_run(su, a.id, ar)
        c = await claim(engine, run)
        assert c is not None
        await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                             run, c["lease"], a.id, plan_json(a, terms, offset=offset))
    snap = await su.fetchval("select id::text from job_lines_history where allocation_run_id = $1",
                             ar)
    for sub in (world.b.planner, world.b.admin, a.viewer, world.outsider):
        async with expect_sqlstate("PL012"):
            await as_user(pg, sub, "select public.restore_job_lines($1)", snap)
    await request_run(pg, a, allocation_run_id=ar)
    async with expect_sqlstate("PL013"):
        await as_user(pg, a.planner, "select public.restore_job_lines($1)", snap)


# -- the engine role -----------------------------------------------------------------------------
async def test_engine_role_is_least_privilege(su: asyncpg.Connection, engine: asyncpg.Connection,
                                              world: World):
    role = await su.fetchrow("select rolsuper, rolbypassrls, rolcreaterole, rolcreatedb"
                             " from pg_roles where rolname = 'planner_engine'")
    assert not any(role.values())
    assert not await su.fetchval("select pg_has_role('planner_engine', 'service_role', 'member')")
    # It reads no tenant table: load_problem (fenced on a lease) and pending_runs read for it.
    # Only the global rule-set catalogue is readable.
    assert await engine.fetchval("select count(*) from planner_rule_sets") > 0
    for sql in (
        "select count(*) from organizations",
        "select count(*) from allocation_runs",
        "select count(*) from terms",
        "select count(*) from teams",
        "select count(*) from team_demand",
        "select count(*) from allocation_planner_runs",
        "select count(*) from planner_private.released_leases",
        "insert into job_lines (organization_id, allocation_run_id, line_number)"
        f" values ('{world.a.id}', '{world.a.allocation_run_id}', 900)",
        "update allocation_planner_runs set status = 'FAILED'",
        "delete from rotations",
        "update teams set name = 'x'",
        "delete from planner_execution_logs",
        "insert into planner_execution_logs (planner_run_id, organization_id, level, message)"
        " select id, organization_id, 'INFO', 'x' from allocation_planner_runs limit 1",
        "select count(*) from job_lines_history",
        "update planner_engine.settings set max_attempts = 20",
        "update planner_engine.limits set max_job_lines = 100000",
        "select * from planner_private.usage_ledger",
        "select planner_private.replace_plan(null, null, null, null, null, null)",
    ):
        async with expect_sqlstate("42501"):
            await engine.execute(sql)


async def test_engine_functions_are_security_definer_with_empty_search_path(
    su: asyncpg.Connection,
):
    rows = await su.fetch(
        "select p.proname, p.prosecdef, p.proconfig, pg_get_userbyid(p.proowner) as owner,"
        " has_function_privilege('authenticated', p.oid, 'execute') as auth_x,"
        " has_function_privilege('anon', p.oid, 'execute') as anon_x,"
        " has_function_privilege('planner_engine', p.oid, 'execute') as engine_x,"
        " has_function_privilege('service_role', p.oid, 'execute') as service_x"
        " from pg_proc p where p.pronamespace = 'planner_engine'::regnamespace")
    assert {r["proname"] for r in rows} == {
        "claim_run", "heartbeat", "load_problem", "commit_plan", "finish_run", "pending_runs",
        "write_logs", "sweep_stale_runs", "self_check", "broadcast", "announce_queued",
        "refusal_counts", "listener_heartbeat", "queue_positions"}
    for r in rows:
        assert r["prosecdef"] and r["proconfig"] == ['search_path=""'], r["proname"]
        assert not r["auth_x"] and not r["anon_x"] and r["engine_x"] and r["service_x"]


# -- Realtime ------------------------------------------------------------------------------------
async def test_run_channel_readable_by_members_only(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
):
    ar, _ = await fresh(su, world)
    run = await insert_run(su, world.a.id, ar)
    topic = f"planner_run:{run}"

    async def can_read(sub: str | None, role: str = "authenticated", t: str = topic) -> bool:
        async with pg.transaction():
            ids = [await pg.fetchval(
                "insert into realtime.messages (topic, extension, payload, event, private)"
                " values ($1, 'broadcast', '{}', 'progress', true) returning id", t)]
            async with acting_as(pg, role, sub=sub) as c:
                await c.execute("select set_config('realtime.topic', $1, true)", t)
                n = await c.fetchval("select count(*) from realtime.messages"
                                     " where id = any($1::uuid[])", ids)
        await su.execute("delete from realtime.messages where topic = $1", t)
        return bool(n)

    assert await can_read(world.a.viewer)
    assert await can_read(world.a.planner)
    assert not await can_read(world.b.planner)
    assert not await can_read(world.outsider)
    assert not await can_read(None, role="anon")
    assert not await can_read(world.a.viewer, t="planner_run:not-a-uuid")
    assert not await can_read(world.a.viewer, t="planner_run:00000000-0000-0000-0000-000000000000")
    # users may not send on it (the engine's messages come from planner_engine.broadcast)
    for sub in (world.a.planner, world.a.admin):
        async with expect_sqlstate("42501"), acting_as(pg, "authenticated", sub=sub) as c:
            await c.execute("select set_config('realtime.topic', $1, true)", topic)
            await c.execute("insert into realtime.messages (topic, extension, payload, event,"
                            " private) values ($1, 'broadcast', '{}', 'fake', true)", topic)


async def test_runs_are_published_with_the_default_replica_identity(su: asyncpg.Connection):
    """Old rows in change events are the key alone (tests/listener/test_change_events.py)."""
    assert await su.fetchval(
        "select true from pg_publication_tables where pubname = 'supabase_realtime'"
        " and schemaname = 'public' and tablename = 'allocation_planner_runs'")
    assert await su.fetchval("select relreplident from pg_class"
                             " where oid = 'public.allocation_planner_runs'::regclass") == b"d"


async def test_load_problem_stays_valid_for_the_solver_after_edits(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine: asyncpg.Connection, world: World
):
    """A tweak to a team without demand, and a smaller request than the current plan."""
    from solver.problem import Problem

    a = world.a
    ar, terms = await new_allocation_run(su, a.id, n_terms=3, teams=a.teams[:3])
    run = await insert_run(su, a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    plan = {"lines": [{"line": i, "rotations": {t: a.teams[(i + k) % 3]
                                                for k, t in enumerate(terms)}, "pinned": []}
                      for i in (1, 2, 3)]}
    await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                         run, c["lease"], a.id, json.dumps(plan))
    no_demand_team = a.teams[4]
    await as_user(pg, a.planner, "update rotations set team_id = $1, pinned = true"
                  " where allocation_run_id = $2 and term_id = $3", no_demand_team, ar, terms[0])
    run2 = await insert_run(su, a.id, ar, n_job_lines=2)
    c2 = await claim(engine, run2)
    assert c2 is not None
    problem = json.loads(await engine.fetchval(
        "select planner_engine.load_problem($1, $2)::text", run2, c2["lease"]))
    assert no_demand_team in {t["id"] for t in problem["teams"]}
    assert [line["line"] for line in problem["previous_plan"]["lines"]] == [1, 2]
    Problem.model_validate(problem)


async def test_engine_role_has_no_grant_on_public(su: asyncpg.Connection):
    """The engine names no object in `public` (its functions do, as their owner)."""
    acl = await su.fetchval("select nspacl::text from pg_namespace where nspname = 'public'")
    assert "planner_engine=" not in acl
