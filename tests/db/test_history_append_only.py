"""History is append-only for planners (issue 14, finding 2).

Deleting allocation runs and terms is for admins; snapshots and log lines survive the deletion
of their allocation run, with their ids; a deletion that removes rotations of a plan snapshots
the plan first; only the service role's explicit purge removes a deleted run's history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg

from tests.db.conftest import (
    World,
    as_user,
    claim,
    expect_sqlstate,
    insert_run,
    new_allocation_run,
    plan_json,
)
from tests.support.roles import acting_as

PLANNER = str(Path(sys.executable).with_name("planner"))


async def _planned_allocation_run(su: asyncpg.Connection, world: World,
                                  n_terms: int = 3) -> tuple[str, list[str], list[str]]:
    """A fresh allocation run of A with two committed plans (one snapshot) and log lines.
    Returns (allocation run, its terms, its two planner runs)."""
    a = world.a
    ar, terms = await new_allocation_run(su, a.id, n_terms=n_terms, teams=a.teams)
    runs = []
    for offset in (0, 1):
        run = await insert_run(su, a.id, ar)
        c = await claim(su, run)
        assert c is not None
        await su.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                         run, c["lease"], a.id, plan_json(a, terms, offset=offset))
        await su.execute(
            "select planner_engine.write_logs($1)",
            json.dumps([{"planner_run_id": run, "lease": str(c["lease"]), "level": "INFO",
                         "message": "hello"}]))
        runs.append(run)
    return ar, terms, runs


async def _plan_with_provenance(conn: asyncpg.Connection, ar: str) -> Any:
    raw = await conn.fetchval("select planner_private.current_plan($1, true)::text", ar)
    return None if raw is None else json.loads(raw)


async def _snapshots(conn: asyncpg.Connection, ar: str) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        "select id, planner_run_id, restored_snapshot_id, n_lines, plan::text as plan"
        " from job_lines_history where allocation_run_id = $1 order by taken_at, id", ar))


async def test_planners_cannot_delete_allocation_runs_or_terms(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Planners may still edit, but deleting an allocation run or a term is an admin's act."""
    a = world.a
    ar, terms, _ = await _planned_allocation_run(su, world)
    gone = await as_user(pg, a.planner,
                         "delete from terms where id = $1 returning id", terms[0])
    assert gone == []
    gone = await as_user(pg, a.planner,
                         "delete from allocation_runs where id = $1 returning id", ar)
    assert gone == []
    assert await su.fetchval("select count(*) from terms where allocation_run_id = $1", ar) == 3
    # ... and the admin may (both snapshot the plan first: tests below).
    gone = await as_user(pg, a.admin, "delete from terms where id = $1 returning id", terms[0])
    assert len(gone) == 1
    gone = await as_user(pg, a.admin, "delete from allocation_runs where id = $1 returning id", ar)
    assert len(gone) == 1


async def test_history_and_logs_survive_their_allocation_run(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Deleting an allocation run deletes its runs, but no snapshot and no log line: they keep
    their allocation run and run ids, and the organisation's members still read them."""
    a = world.a
    ar, _, runs = await _planned_allocation_run(su, world)
    history_before = await su.fetch(
        "select id, allocation_run_id, planner_run_id from job_lines_history"
        " where allocation_run_id = $1 order by id", ar)
    logs_before = await su.fetch(
        "select id, planner_run_id, allocation_run_id from planner_execution_logs"
        " where planner_run_id = any($1::uuid[]) order by id", runs)
    assert len(history_before) == 1 and len(logs_before) >= 2
    assert {str(r["allocation_run_id"]) for r in logs_before} == {ar}

    await as_user(pg, a.admin, "delete from allocation_runs where id = $1", ar)
    assert await su.fetchval("select count(*) from allocation_planner_runs"
                             " where allocation_run_id = $1", ar) == 0

    history_after = await su.fetch(
        "select id, allocation_run_id, planner_run_id from job_lines_history"
        " where allocation_run_id = $1 and id = any($2::uuid[]) order by id",
        ar, [r["id"] for r in history_before])
    assert history_after == history_before  # same rows, same ids (planner_run_id kept)
    logs_after = await su.fetch(
        "select id, planner_run_id, allocation_run_id from planner_execution_logs"
        " where planner_run_id = any($1::uuid[]) order by id", runs)
    assert logs_after == logs_before
    # Still readable by the organisation's viewer, still hidden from B.
    seen = await as_user(pg, a.viewer, "select count(*) from planner_execution_logs"
                         " where planner_run_id = any($1::uuid[])", runs)
    assert seen[0][0] == len(logs_before)
    seen = await as_user(pg, world.b.admin, "select count(*) from job_lines_history"
                         " where allocation_run_id = $1", ar)
    assert seen[0][0] == 0
    # A snapshot of a deleted allocation run cannot be restored (nothing to restore into).
    async with expect_sqlstate("PL002"):
        await as_user(pg, a.planner, "select public.restore_job_lines($1)",
                      history_before[0]["id"])


async def test_deleting_a_term_snapshots_the_plan_first(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """A term's deletion cascades its rotations (2 lines x 4 terms: 8 -> 6 -> 2); the plan
    before it is kept as a snapshot, once per transaction however many terms go."""
    a = world.a
    ar, terms, _ = await _planned_allocation_run(su, world, n_terms=4)
    before = await _plan_with_provenance(su, ar)
    n_snapshots = len(await _snapshots(su, ar))
    assert await su.fetchval("select count(*) from rotations where allocation_run_id = $1",
                             ar) == 8

    await as_user(pg, a.admin, "delete from terms where id = $1", terms[0])
    assert await su.fetchval("select count(*) from rotations where allocation_run_id = $1",
                             ar) == 6
    snaps = await _snapshots(su, ar)
    assert len(snaps) == n_snapshots + 1
    new = snaps[-1]
    assert json.loads(new["plan"]) == before and new["n_lines"] == 2
    assert new["planner_run_id"] is None and new["restored_snapshot_id"] is None

    # Two terms in one statement: one snapshot, of the plan before both went.
    before = await _plan_with_provenance(su, ar)
    await as_user(pg, a.admin, "delete from terms where id = any($1::uuid[])", terms[1:3])
    assert await su.fetchval("select count(*) from rotations where allocation_run_id = $1",
                             ar) == 2
    snaps = await _snapshots(su, ar)
    assert len(snaps) == n_snapshots + 2
    assert json.loads(snaps[-1]["plan"]) == before
    # The snapshot restores the lines' rotations for the terms still there (here: none
    # missing): it is a real plan in commit_plan's shape.
    assert {len(line["rotations"]) for line in before["lines"]} == {3}


async def test_deleting_an_allocation_run_snapshots_its_plan(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    a = world.a
    ar, _, _ = await _planned_allocation_run(su, world)
    before = await _plan_with_provenance(su, ar)
    n_snapshots = len(await _snapshots(su, ar))
    await as_user(pg, a.admin, "delete from allocation_runs where id = $1", ar)
    snaps = await _snapshots(su, ar)
    assert len(snaps) == n_snapshots + 1  # one, although its terms went by cascade too
    assert json.loads(snaps[-1]["plan"]) == before
    taken_by = await su.fetchval("select taken_by::text from job_lines_history where id = $1",
                                 snaps[-1]["id"])
    assert taken_by == a.admin
    # Without a plan there is nothing to keep: no empty snapshot.
    ar2, _ = await new_allocation_run(su, a.id, teams=a.teams)
    await as_user(pg, a.admin, "delete from allocation_runs where id = $1", ar2)
    assert await _snapshots(su, ar2) == []


async def test_log_lines_take_their_allocation_run_from_the_run(
    su: asyncpg.Connection, world: World
) -> None:
    """A writer cannot file a log line under another allocation run: the trigger sets it."""
    a = world.a
    run = await insert_run(su, a.id, a.allocation_run_id)
    other, _ = await new_allocation_run(su, a.id)
    async with acting_as(su, "service_role") as c:
        await c.execute("insert into planner_execution_logs (planner_run_id, organization_id,"
                        " allocation_run_id, level, message) values ($1, $2, $3, 'INFO', 'x')",
                        run, a.id, other)
    got = await su.fetchval("select allocation_run_id::text from planner_execution_logs"
                            " where planner_run_id = $1", run)
    assert got == a.allocation_run_id


async def test_only_the_service_role_purges_and_only_deleted_runs(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    a = world.a
    ar, _, runs = await _planned_allocation_run(su, world)
    # Nobody but the service role may call it.
    for sub in (a.admin, a.planner):
        async with expect_sqlstate("42501"):
            await as_user(pg, sub, "select planner_private.purge_history($1)", ar)
    await pg.execute("begin; set local role planner_engine")
    try:
        async with expect_sqlstate("42501"):
            await pg.execute("select planner_private.purge_history($1)", ar)
    finally:
        await pg.execute("rollback")
    # A live allocation run's history is refused.
    async with expect_sqlstate("PL033"), acting_as(pg, "service_role") as c:
        await c.execute("select planner_private.purge_history($1)", ar)

    await as_user(pg, a.admin, "delete from allocation_runs where id = $1", ar)
    n_snap = len(await _snapshots(su, ar))
    n_logs = await su.fetchval("select count(*) from planner_execution_logs"
                               " where planner_run_id = any($1::uuid[])", runs)
    assert n_snap == 2 and n_logs >= 2
    other_logs = await su.fetchval("select count(*) from planner_execution_logs")
    async with acting_as(pg, "service_role") as c:
        raw = await c.fetchval("select planner_private.purge_history($1)::text", ar)
    assert json.loads(raw) == {"snapshots": n_snap, "logs": n_logs}
    assert await _snapshots(su, ar) == []
    assert await su.fetchval("select count(*) from planner_execution_logs") == \
        other_logs - n_logs


def _planner(*args: str, db_url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": db_url, "COLUMNS": "250"}
    return subprocess.run([PLANNER, *args], capture_output=True, text=True, timeout=120,
                          env=env)


async def test_planner_history_purge_command(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World, db_url: str
) -> None:
    """`planner history purge --allocation-run ID`: one line for a live run (PL033, with the
    fix), the counts after its deletion; never a traceback."""
    a = world.a
    ar, _, _ = await _planned_allocation_run(su, world)
    live = _planner("history", "purge", "--allocation-run", ar, db_url=db_url)
    assert live.returncode == 1, live
    assert "Traceback" not in live.stdout + live.stderr
    (line,) = live.stderr.splitlines()  # one line on stderr: the error and its hint
    assert line.startswith("error (PL033)") and "delete the allocation run first" in line

    await as_user(pg, a.admin, "delete from allocation_runs where id = $1", ar)
    done = _planner("history", "purge", "--allocation-run", ar, db_url=db_url)
    assert done.returncode == 0, done
    assert f"allocation run {ar}: purged 2 snapshot(s) and" in done.stdout
    assert await _snapshots(su, ar) == []
