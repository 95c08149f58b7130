"""The operator commands and `planner demo`, run as a user would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from devstack.seed import SeededOrganization
from tests.listener.conftest import ListenerFactory
from tests.support.harness import TERMINAL, insert_run, wait_for_status

PLANNER = str(Path(sys.executable).with_name("planner"))


def planner(
    *args: str, db_url: str | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}  # wide enough that tables show whole ids
    if db_url is not None:
        env["DATABASE_URL"] = db_url
    res = subprocess.run([PLANNER, *args], capture_output=True, text=True, timeout=180, env=env)
    if ok:
        assert res.returncode == 0, f"{args}:\n{res.stdout}\n{res.stderr}"
    return res


def test_operator_commands_need_an_explicit_database(tmp_path: Path):
    """No DATABASE_URL and no --database-url: one line naming both fixes, never the local
    superuser by default (a production command must not land on the wrong database). Run
    outside the checkout, the hint names the command by its absolute path."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    nobody = "00000000-0000-0000-0000-000000000000"
    for args in (["migrate"], ["runs", "list"], ["runs", "cancel", nobody], ["history", "list"]):
        res = subprocess.run([PLANNER, *args], capture_output=True, text=True, timeout=60,
                             env=env, cwd=tmp_path)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert res.stderr.splitlines() == [
            "error: no database given: set DATABASE_URL or pass --database-url "
            f'(local stack: eval "$({PLANNER} dev env)")'
        ], args


async def test_runs_and_history_commands(
    db: asyncpg.Connection, db_url: str, orgs: list[SeededOrganization],
    listeners: ListenerFactory,
):
    org = orgs[5]
    listeners("L1")
    opts = {"time_limit_seconds": 1}
    first = await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                             allocation_run_id=org.allocation_run_id,
                             n_job_lines=org.suggested_n_job_lines,
                             constraints=org.suggested_constraints, options=opts)
    assert (await wait_for_status(db, first, TERMINAL, 60))["status"] == "COMPLETED"
    second = await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                              allocation_run_id=org.allocation_run_id,
                              n_job_lines=org.suggested_n_job_lines,
                              constraints=org.suggested_constraints, options=opts)
    assert (await wait_for_status(db, second, TERMINAL, 60))["status"] == "COMPLETED"

    listing = planner("runs", "list", "--status", "completed", db_url=db_url).stdout
    assert first in listing and second in listing
    shown = planner("runs", "show", second, db_url=db_url).stdout
    assert '"status": "COMPLETED"' in shown and '"solver_status"' in shown
    logs = planner("runs", "logs", second, db_url=db_url).stdout
    assert "plan written" in logs
    history = planner("history", "list", "--allocation-run", org.allocation_run_id,
                      db_url=db_url).stdout
    snapshot = await db.fetchval(
        "select id::text from job_lines_history where planner_run_id = $1", second)
    assert snapshot and snapshot in history
    before = await db.fetchval(
        "select plan from job_lines_history where id = $1", snapshot)
    restored = planner("history", "restore", snapshot, db_url=db_url).stdout
    assert f"restored snapshot {snapshot}" in restored
    current = await db.fetchval(
        "select count(*) from job_lines where allocation_run_id = $1", org.allocation_run_id)
    assert current == org.suggested_n_job_lines and before is not None

    bad = planner("runs", "cancel", "not-a-uuid", db_url=db_url, ok=False)
    assert bad.returncode == 2 and "not a run or snapshot id" in bad.stdout
    missing = planner("runs", "show", "00000000-0000-0000-0000-000000000000",
                      db_url=db_url, ok=False)
    assert missing.returncode == 1 and "no run" in missing.stdout


async def test_cancel_command_on_a_pending_run(
    db: asyncpg.Connection, db_url: str, orgs: list[SeededOrganization],
):
    org = orgs[6]  # no listener in this test: the run stays PENDING until cancelled
    run = await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                           allocation_run_id=org.allocation_run_id,
                           n_job_lines=org.suggested_n_job_lines,
                           constraints=org.suggested_constraints, options={})
    out = planner("runs", "cancel", run, db_url=db_url).stdout
    assert "status now CANCELLED" in out
    logs = planner("runs", "logs", run, db_url=db_url).stdout
    assert "Cancelled" in logs


@pytest.mark.stack  # `planner demo` starts the local stack itself
def test_demo_twice_plans_then_snapshots_and_restores():
    """`planner demo` (what `make demo` runs) on the developer's stack: the first call may
    be the demo organisation's first plan; the second always replaces a plan, so it shows
    the snapshot and restores it."""
    first = planner("demo", "--time-limit", "4")
    assert "COMPLETED" in first.stdout and "Where it lives" in first.stdout
    second = planner("demo", "--time-limit", "4")
    assert "snapshotted the previous plan" in second.stdout
    assert "Restored it as the planner" in second.stdout
    assert "Listener stopped (exit 0)" in second.stdout
    run_printed_hints(second.stdout)


def run_printed_hints(out: str) -> None:
    """The demo's follow-up commands work as printed, in a shell without the virtualenv on
    PATH and without DATABASE_URL, from the folder the demo ran in."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Look at it"))
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    assert block[0] == 'eval "$(.venv/bin/planner dev env)"', block
    assert all(cmd.startswith(".venv/bin/planner ") for cmd in block[1:]), block
    undo = re.search(r"`(\S+ history restore [0-9a-f-]{36})`", out)
    assert undo is not None, out
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["PATH"] = "/usr/bin:/bin"
    script = "set -e\n" + "\n".join([*block, undo.group(1)])
    res = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"{script}\n{res.stdout}\n{res.stderr}"
    assert '"status": "COMPLETED"' in res.stdout and "restored snapshot" in res.stdout
