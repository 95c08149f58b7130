"""The product end to end: manager inserts a run -> Realtime -> listener -> solver -> database.

Everything is real: PostgreSQL with the migrations, the local Realtime server, `planner listen`
subprocesses, the CP-SAT child process, and realtime-js for the UI's side.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from devstack import keys
from devstack.seed import SeededOrganization
from devstack.settings import DevSettings
from solver import validate_plan
from tests.listener.conftest import ListenerFactory
from tests.realtime.helpers import JsClient
from tests.support.harness import (
    TERMINAL,
    child_pids,
    insert_run,
    process_alive,
    run_row,
    stored_problem_and_plan,
    until,
    wait_all,
    wait_for_status,
)
from tests.support.realtime import RealtimeServer
from tests.support.roles import acting_as

pytestmark = pytest.mark.timeout(180)

QUICK = {"time_limit_seconds": 1, "deterministic": True}


async def start_run(
    db: asyncpg.Connection, org: SeededOrganization, options: dict[str, object] | None = None,
    **over: object,
) -> str:
    return await insert_run(
        db, user_id=org.planner.id, organization_id=org.id,
        allocation_run_id=org.allocation_run_id,
        n_job_lines=int(over.get("n_job_lines", org.suggested_n_job_lines)),  # type: ignore[call-overload]
        constraints=list(over.get("constraints", org.suggested_constraints)),  # type: ignore[call-overload]
        options=QUICK if options is None else options,
    )


async def cancel(db: asyncpg.Connection, org: SeededOrganization, run_id: str) -> None:
    async with acting_as(db, "authenticated", sub=org.planner.id) as c:
        await c.execute("select public.request_cancel($1)", run_id)


async def plan_size(db: asyncpg.Connection, org: SeededOrganization) -> int:
    return int(await db.fetchval(
        "select count(*) from job_lines where allocation_run_id = $1", org.allocation_run_id))


async def assert_valid_plan(db: asyncpg.Connection, run_id: str) -> None:
    problem, plan = await stored_problem_and_plan(db, run_id)
    assert len(plan.lines) == problem.n_job_lines
    assert validate_plan(problem, plan) == []


async def logs_of(
    db: asyncpg.Connection, run_id: str, containing: str | None = None, wait_s: float = 5.0
) -> list[asyncpg.Record]:
    """The run's log rows; with `containing`, wait (the sink flushes in batches) for one."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        rows = await db.fetch(
            "select level, message, traceback from planner_execution_logs"
            " where planner_run_id = $1 order by logged_at, id", run_id,
        )
        if containing is None or any(containing in r["message"] for r in rows):
            return rows
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no log row {containing!r} for run {run_id} in {wait_s}s;"
                                 f" have {[r['message'] for r in rows]}")
        await asyncio.sleep(0.1)


async def test_insert_to_valid_plan_with_progress_for_members_only(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
    rt_server: RealtimeServer, dev_settings: DevSettings,
):
    a, b = orgs[0], orgs[1]
    # The run exists before any listener does, so both UI clients can join its channel first.
    run_id = await start_run(db, a, {"time_limit_seconds": 2, "deterministic": True})
    # B's own run, cancelled at once: later a change to it is the outsider's sentinel.
    b_run = await start_run(db, b)
    await cancel(db, b, b_run)
    anon = keys.api_key("anon", dev_settings.jwt_secret)
    member, outsider = JsClient(rt_server.url, anon), JsClient(rt_server.url, anon)
    await member.start()
    await outsider.start()
    try:
        await member.cmd(cmd="setAuth", token=a.planner.access_token)
        await outsider.cmd(cmd="setAuth", token=b.planner.access_token)
        spec = {"config": {"private": True}, "broadcast": ["status", "progress", "done"],
                "pg": [{"event": "*", "schema": "public", "table": "allocation_planner_runs"}]}
        assert await member.channel(f"planner_run:{run_id}", **spec) == "SUBSCRIBED"
        assert await outsider.channel(f"planner_run:{run_id}", **spec) == "CHANNEL_ERROR"
        # The outsider may still watch the runs table: RLS must hide organisation A's rows.
        assert await outsider.channel(
            "runs-b", pg=[{"event": "*", "schema": "public",
                           "table": "allocation_planner_runs"}]) == "SUBSCRIBED"

        listener = listeners("L1")
        row = await wait_for_status(db, run_id, TERMINAL, timeout_s=60)
        assert row["status"] == "COMPLETED", row
        # Logged after the run's last broadcast returned (REST: fanned out before the reply).
        await listener.wait_record("run finished")
        await assert_valid_plan(db, run_id)

        def is_done(e: dict[str, Any]) -> bool:
            return e.get("type") == "broadcast" and e["payload"]["event"] == "done"

        # One terminal event, the last broadcast ("run finished" is logged after it was sent).
        later = await member.events.after(is_done, wait_s=10)
        assert [e for e in later if e.get("type") == "broadcast"] == [], later
        done = await member.events.wait(is_done)
        assert not [e for e in member.events.items if is_done(e)], "done is sent once"
        assert done["payload"]["payload"]["status"] == "COMPLETED"
        kinds = [e["payload"]["event"] for e in member.events.items if e.get("type") == "broadcast"]
        assert "progress" in kinds and "status" in kinds
        phases = [e["payload"]["payload"]["phase"] for e in member.events.items
                  if e.get("type") == "broadcast" and e["payload"]["event"] == "status"]
        assert phases == ["loading", "solving", "writing"], phases
        assert done["payload"]["payload"]["version"] == 1
        assert done["payload"]["payload"]["result"]["solver_status"] in ("OPTIMAL", "FEASIBLE")
        progress = [e["payload"]["payload"] for e in member.events.items
                    if e.get("type") == "broadcast" and e["payload"]["event"] == "progress"]
        assert set(progress[-1]) >= {"run_id", "solutions", "objective", "best_bound", "gap",
                                     "elapsed_ms", "time_limit_ms"}
        # The member also saw its row change; the outsider saw nothing of organisation A.
        await member.events.wait(lambda e: e.get("type") == "postgres_changes", wait_s=5)
        # The sentinel: a change of B's run, committed after A's last change and A's last
        # broadcast; the outsider sees it, and anything of A's would have come before it.
        await db.execute("update allocation_planner_runs set error = error where id = $1", b_run)
        await outsider.events.none_before(
            lambda e: e.get("type") in ("broadcast", "postgres_changes"),
            sentinel=lambda e: e.get("type") == "postgres_changes"
            and e["payload"].get("new", {}).get("id") == b_run, wait_s=10)
        # Run logs landed in the database, bound to the run and its organisation.
        logs = await logs_of(db, run_id, "plan written")
        assert any("plan written" in r["message"] for r in logs)
        status, ready = listener.readiness()
        assert status == 200 and ready["realtime"] is True and ready["database"] is True
    finally:
        await member.close()
        await outsider.close()


async def test_ten_organisations_at_once_are_solved_one_at_a_time(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
):
    listener = listeners("L1")
    await listener.wait_ready()
    # Organisations served by earlier tests wait for those never served (round robin).
    served = {r[0]: r[1] for r in await db.fetch(
        "select organization_id, last_claimed_at from planner_private.organization_claims")}
    runs = [await start_run(db, org) for org in orgs[:10]]  # ten inserts within ~50 ms
    rows = await wait_all(db, runs, timeout_s=120)
    assert [r["status"] for r in rows] == ["COMPLETED"] * 10
    spans = sorted((r["claimed_at"], r["finished_at"]) for r in rows)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, "two solves overlapped inside one listener"
    # The database's order, not the events': at each claim, no run that had been waiting a
    # while (0.2 s: visible for sure) had a better place in the round robin (its organisation
    # served less recently, or never; then the older run).
    never = datetime.min.replace(tzinfo=UTC)

    def place(r: asyncpg.Record) -> tuple[datetime, datetime, str]:
        return served.get(r["organization_id"], never), r["created_at"], str(r["id"])

    for claimed in rows:
        t = claimed["claimed_at"]
        waiting = [r for r in rows if r["claimed_at"] > t
                   and (t - r["created_at"]).total_seconds() > 0.2]
        assert all(place(claimed) < place(r) for r in waiting), (claimed, waiting)
    for run_id in runs:
        await assert_valid_plan(db, run_id)


async def test_realtime_outage_runs_complete_through_catch_up(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
    rt_server: RealtimeServer,
):
    listener = listeners("L1")
    await listener.wait_ready()
    rt_server.stop()
    try:
        runs = [await start_run(db, org) for org in orgs[:3]]
        rows = await wait_all(db, runs, timeout_s=60)
        assert [r["status"] for r in rows] == ["COMPLETED"] * 3
        status, ready = listener.readiness()
        assert status == 503 and ready["realtime"] is False and ready["database"] is True
    finally:
        rt_server.start()
    await listener.wait_ready(timeout_s=60)
    run = await start_run(db, orgs[3])
    assert (await wait_for_status(db, run, TERMINAL, 30))["status"] == "COMPLETED"
    # The supervisor recreated the client (the outage outlasted PLANNER_REALTIME_STALE_AFTER_S).
    with urllib.request.urlopen(f"http://127.0.0.1:{listener.health_port}/metrics") as resp:
        text = resp.read().decode()
    reconnects = next(float(line.split()[-1]) for line in text.splitlines()
                      if line.startswith("planner_realtime_reconnects_total "))
    assert reconnects >= 1


async def test_cancel_stops_the_solve_and_keeps_the_old_plan(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
):
    big = orgs[-1]
    listener = listeners("L1")
    await listener.wait_ready()
    before = await plan_size(db, big)
    run_id = await start_run(db, big, {"time_limit_seconds": 60})
    await wait_for_status(db, run_id, {"GENERATING"}, 30)
    await listener.wait_solving()  # the cancel must stop a running solve
    await cancel(db, big, run_id)
    row = await wait_for_status(db, run_id, TERMINAL, timeout_s=20)
    assert row["status"] == "CANCELLED"
    after = await plan_size(db, big)
    assert after == before


async def test_sigterm_mid_solve_requeues_and_a_second_listener_completes(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
):
    big = orgs[-1]
    first = listeners("L1", PLANNER_SHUTDOWN_GRACE_S=1)
    await first.wait_ready()
    run_id = await start_run(db, big, {"time_limit_seconds": 60})
    row = await wait_for_status(db, run_id, {"GENERATING"}, 30)
    assert row["worker_id"] == "L1"
    await first.wait_solving()  # SIGTERM mid-solve, not while loading
    first.terminate()
    assert await first.wait(timeout_s=30) == 0, first.log()
    row = await run_row(db, run_id)
    assert row["status"] == "PENDING" and row["worker_id"] is None, row
    # A second listener takes it over and completes it (the operator shortened the run's cap
    # to 3 s meanwhile: the cap is the row's, whichever listener solves it).
    await db.execute("update allocation_planner_runs set time_limit_s = 3 where id = $1", run_id)
    second = listeners("L2")
    row = await wait_for_status(db, run_id, TERMINAL, timeout_s=60)
    assert row["status"] == "COMPLETED" and row["worker_id"] == "L2"
    await assert_valid_plan(db, run_id)
    assert any("re-queued" in r.get("message", "") for r in first.records())
    second.stop_now()


@pytest.mark.parametrize("max_attempts", [3, 1])
async def test_kill_9_mid_solve_is_rescued_by_the_sweeper(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
    max_attempts: int,
):
    big = orgs[-1]
    first = listeners("L1")
    await first.wait_ready()
    run_id = await start_run(db, big, {"time_limit_seconds": 60})
    await db.execute("update allocation_planner_runs set max_attempts = $2 where id = $1",
                     run_id, max_attempts)
    await wait_for_status(db, run_id, {"GENERATING"}, 30)
    await first.wait_solving()  # the solver child (and the next spare) have been started
    solver_children = child_pids(first.proc.pid if first.proc else 0)
    assert solver_children, "a solving listener has solver children"
    first.kill()
    await first.wait()
    # The children notice their parent's death (PR_SET_PDEATHSIG, a watchdog) and exit.
    await until(lambda: not any(process_alive(p) for p in solver_children) or None, 15,
                "the solver child outlived its killed listener")
    assert (await run_row(db, run_id))["status"] == "GENERATING"
    # Nobody heartbeats the run any more: wait until its lease is older than the TTL below.
    await until(lambda: db.fetchval(
        "select nullif(heartbeat_at < now() - interval '1 second', false)"
        " from allocation_planner_runs where id = $1", run_id), 15,
        "the killed listener's run still has a fresh heartbeat")
    swept = await db.fetchval("select planner_private.sweep_stale_runs('1 second')")
    assert swept >= 1
    row = await run_row(db, run_id)
    logs = await logs_of(db, run_id, "Timeout")
    assert any("Timeout" in r["message"] for r in logs)
    if max_attempts == 1:
        assert row["status"] == "FAILED", row
        return
    assert row["status"] == "PENDING"
    await db.execute("update allocation_planner_runs set time_limit_s = 3 where id = $1", run_id)
    listeners("L2")
    row = await wait_for_status(db, run_id, TERMINAL, timeout_s=60)
    assert row["status"] == "COMPLETED" and row["attempts"] == 2
    await assert_valid_plan(db, run_id)


async def test_two_listeners_twenty_runs_each_solved_exactly_once(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
):
    one, two = listeners("L1"), listeners("L2")
    await one.wait_ready()
    await two.wait_ready()
    runs: list[str] = []
    for _wave in range(2):  # one active run per allocation run: two waves of ten
        batch = [await start_run(db, org) for org in orgs[:10]]
        runs += batch
        await wait_all(db, batch, timeout_s=120)
    rows = [await run_row(db, r) for r in runs]
    assert all(r["status"] == "COMPLETED" and r["attempts"] == 1 for r in rows)
    assert {r["worker_id"] for r in rows} == {"L1", "L2"}, "both listeners took work"
    claims = [rec.get("planner_run_id") for proc in (one, two) for rec in proc.records()
              if rec.get("message", "").startswith("run claimed")]
    assert sorted(claims) == sorted(runs), "every run claimed exactly once"


async def test_infeasible_and_invalid_runs_end_with_readable_logs(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
):
    listener = listeners("L1")
    await listener.wait_ready()
    org_x, org_y = orgs[10], orgs[11]
    # More lines than the demand can ever hold, with the minimum made hard: infeasible.
    await db.execute(
        "update team_demand set min_lines = max_lines where allocation_run_id = $1",
        org_x.allocation_run_id,
    )
    infeasible = await start_run(db, org_x, {"time_limit_seconds": 5, "strict_minimum": True},
                                 n_job_lines=2)
    invalid = await start_run(db, org_y, {"time_limit_seconds": 1, "bogus_option": True})
    rows = {r["id"].__str__(): r for r in await wait_all(db, [infeasible, invalid], 60)}
    bad = rows[infeasible]
    assert bad["status"] == "INFEASIBLE", bad
    meta = json.loads(bad["result_metadata"]) if isinstance(bad["result_metadata"], str) \
        else bad["result_metadata"]
    assert meta["explanation"], "a manager-readable explanation is stored"
    inv = rows[invalid]
    assert inv["status"] == "FAILED" and "invalid input" in inv["error"]
    assert "bogus_option" in inv["error"]
    assert any("bogus_option" in r["message"]
               for r in await logs_of(db, invalid, "bogus_option"))
    assert any("infeasible" in r["message"]
               for r in await logs_of(db, infeasible, "infeasible"))


async def test_docs_realtime_js_snippet_follows_a_run(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
    rt_server: RealtimeServer, dev_settings: DevSettings,
):
    """The snippet UI authors copy from docs/listener.md works as written: with the pinned
    current supabase-js and a signed-in session (tests/listener/test_ui_snippet.py runs it
    with every pinned install, both token paths and a Realtime restart)."""
    org = orgs[2]
    run_id = await start_run(db, org, {"time_limit_seconds": 2})
    anon = keys.api_key("anon", dev_settings.jwt_secret)
    script = JsClient.available() and Path(__file__).resolve().parents[1] / "js" / "watch_run.mjs"
    assert script, "supabase-js is installed by make test"
    node = await asyncio.create_subprocess_exec(
        "node", str(script), "@supabase/supabase-js", "session", "snippet",
        rt_server.url, anon, org.planner.access_token, run_id,
        cwd=str(script.parent), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    assert node.stdout is not None
    versions = json.loads(await asyncio.wait_for(node.stdout.readline(), 15))
    assert versions["type"] == "versions", versions
    first = json.loads(await asyncio.wait_for(node.stdout.readline(), 15))
    assert first == {"type": "subscribed", "payload": {"id": run_id}}
    listeners("L1")
    out, err = await asyncio.wait_for(node.communicate(), 90)
    assert node.returncode == 0, err.decode()
    events = [json.loads(line) for line in out.decode().splitlines()]
    types = [e["type"] for e in events]
    assert "progress" in types and "row" in types and "done" in types, types
    done = next(e for e in events if e["type"] == "done")
    assert done["payload"]["status"] == "COMPLETED"
    assert {"phase": "solving", "position": None} in [
        {"phase": e["payload"]["phase"], "position": e["payload"].get("position")}
        for e in events if e["type"] == "status"
    ]


async def test_lease_lost_mid_solve_writes_nothing_and_the_run_is_redone(
    db: asyncpg.Connection, orgs: list[SeededOrganization], listeners: ListenerFactory,
):
    """The sweeper takes a run from a live but (seemingly) stalled listener: the listener's
    next heartbeat sees the lease is gone, kills its solve and writes nothing; the run is
    then claimed again and committed exactly once."""
    big = orgs[-1]
    proc = listeners("L1")
    await proc.wait_ready()
    if await plan_size(db, big) == 0:
        # A commit snapshots the plan it replaces: make sure there is one (run on its own,
        # this test would otherwise find no snapshot at all).
        first = await start_run(db, big, {"time_limit_seconds": 4})
        assert (await wait_for_status(db, first, TERMINAL, 60))["status"] == "COMPLETED"
    run_id = await start_run(db, big, {"time_limit_seconds": 4})
    await wait_for_status(db, run_id, {"GENERATING"}, 30)
    await proc.wait_solving()  # the lease is lost mid-solve
    assert await db.fetchval("select planner_private.sweep_stale_runs('0 seconds')") >= 1
    row = await wait_for_status(db, run_id, TERMINAL, timeout_s=60)
    assert row["status"] == "COMPLETED" and row["attempts"] == 2, row
    snapshots = await db.fetchval(
        "select count(*) from job_lines_history where planner_run_id = $1", run_id)
    assert snapshots == 1, "exactly one commit for the run (the lost attempt wrote nothing)"
    await proc.wait_record("lease lost")
    await assert_valid_plan(db, run_id)
