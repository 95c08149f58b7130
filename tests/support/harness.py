"""Drive the real product end to end: `planner listen` processes, runs inserted as a manager.

Used by the listener's end-to-end tests and the fault campaign (tests/chaos). Nothing here is
a stand-in: listeners are real `planner listen` subprocesses, runs are inserted as an
`authenticated` user exactly as PostgREST would insert them, and outcomes are read back from
the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg

from devstack import keys
from devstack.settings import DevSettings
from tests.support.realtime import free_port
from tests.support.roles import acting_as

PLANNER = str(Path(sys.executable).with_name("planner"))
T = TypeVar("T")
TERMINAL = frozenset({"COMPLETED", "INFEASIBLE", "FAILED", "CANCELLED"})


def listener_env(
    settings: DevSettings, database: str, supabase_url: str, **overrides: str | float | int
) -> dict[str, str]:
    """Environment of a listener on one test database, with test-friendly intervals."""
    env = {
        # Without the variables that would override the key below (a shell that ran
        # `eval "$(planner dev env)"` has SUPABASE_SECRET_KEY, which the listener prefers;
        # the demo and tests/listener/test_deploy_checks.py run the sb_secret_ key).
        **{k: v for k, v in os.environ.items() if k not in ("SUPABASE_SECRET_KEY", "PORT")},
        "PLANNER_DATABASE_URL": settings.engine_dsn(database),
        "SUPABASE_URL": supabase_url,
        "SUPABASE_SERVICE_ROLE_KEY": keys.api_key("service_role", settings.jwt_secret),
        "PLANNER_HEARTBEAT_INTERVAL_S": "1",
        "PLANNER_RECONCILE_INTERVAL_S": "2",
        "PLANNER_SHUTDOWN_GRACE_S": "2",
        "PLANNER_REALTIME_STALE_AFTER_S": "3",
        "PLANNER_SOLVER_WORKERS": "1",
        "PLANNER_SOLVER_MEMORY_MB": "1024",
        "PLANNER_HEALTH_HOST": "127.0.0.1",
        "PLANNER_LOG_FORMAT": "json",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@dataclass
class ListenerProcess:
    """One `planner listen` subprocess, its JSON log in a file."""

    env: dict[str, str]
    log_path: Path
    worker_id: str
    proc: subprocess.Popen[bytes] | None = None
    health_port: int = field(default_factory=free_port)

    def start(self) -> ListenerProcess:
        env = {**self.env, "PLANNER_WORKER_ID": self.worker_id,
               "PLANNER_HEALTH_PORT": str(self.health_port)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [PLANNER, "listen"], env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def readiness(self) -> tuple[int, dict[str, Any]]:
        url = f"http://127.0.0.1:{self.health_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except OSError:
            return 0, {}

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"listener exited {self.proc.returncode}:\n{self.log()}")
            status, _ = await asyncio.to_thread(self.readiness)
            if status == 200:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"listener not ready after {timeout_s}s:\n{self.log()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    def terminate(self) -> None:
        self.signal(signal.SIGTERM)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    async def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"listener did not exit in {timeout_s}s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode

    def stop_now(self) -> None:
        """Test teardown: SIGTERM, then SIGKILL if it lingers."""
        stop_all([self])

    def log(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    async def wait_record(
        self, containing: str, timeout_s: float = 15.0
    ) -> dict[str, Any]:
        """The first JSON log record whose message contains `containing`, once it is written."""
        def found() -> dict[str, Any] | None:
            return next((r for r in self.records() if containing in r.get("message", "")), None)

        return await until(found, timeout_s,
                           lambda: f"no log record {containing!r}:\n{self.log()}")

    def metrics(self) -> dict[str, float]:
        """The listener's /metrics as {sample name with labels: value} ({} if unreachable)."""
        url = f"http://127.0.0.1:{self.health_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    async def wait_metric(
        self, sample: str, accept: Callable[[float], bool], timeout_s: float = 30.0
    ) -> float:
        """Poll /metrics until `sample` (e.g. `planner_solving`) has an accepted value."""
        def check() -> float | None:
            value = self.metrics().get(sample)
            return value if value is not None and accept(value) else None

        return await until(
            lambda: asyncio.to_thread(check), timeout_s,
            lambda: f"metric {sample} = {self.metrics().get(sample)}:\n{self.log()}")

    async def wait_solving(self, timeout_s: float = 30.0) -> None:
        """Until this listener's solver child has started on a run (`planner_solving` 1)."""
        await self.wait_metric("planner_solving", lambda v: v == 1, timeout_s)


def stop_all(procs: list[ListenerProcess]) -> None:
    """Test teardown of several listeners: SIGTERM to every one first, then wait for each
    (SIGKILL if it lingers past 15 s), so they shut down side by side, not one by one."""
    live = [p for p in procs if p.proc is not None and p.proc.poll() is None]
    for p in live:
        p.terminate()
    for p in live:
        assert p.proc is not None
        try:
            p.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.proc.wait(timeout=5)


async def insert_run(
    conn: asyncpg.Connection,
    *,
    user_id: str,
    organization_id: str,
    allocation_run_id: str,
    n_job_lines: int,
    constraints: list[str],
    options: dict[str, Any] | None = None,
) -> str:
    """Insert a run as the manager's UI would (PostgREST: role authenticated + JWT claims)."""
    async with acting_as(conn, "authenticated", sub=user_id) as c:
        run_id = await c.fetchval(
            "insert into public.allocation_planner_runs"
            " (organization_id, allocation_run_id, n_job_lines, constraints, options)"
            " values ($1, $2, $3, $4, $5::jsonb) returning id::text",
            organization_id, allocation_run_id, n_job_lines, constraints,
            json.dumps(options or {}),
        )
    return str(run_id)


async def run_row(conn: asyncpg.Connection, run_id: str) -> dict[str, Any]:
    row = await conn.fetchrow("select * from allocation_planner_runs where id = $1", run_id)
    assert row is not None, f"run {run_id} vanished"
    return dict(row)


async def wait_for_status(
    conn: asyncpg.Connection,
    run_id: str,
    statuses: frozenset[str] | set[str] = TERMINAL,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        row = await run_row(conn, run_id)
        if row["status"] in statuses:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} still {row['status']} after {timeout_s}s: {row}")
        await asyncio.sleep(0.1)


async def wait_all(
    conn: asyncpg.Connection, run_ids: list[str], timeout_s: float = 120.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    return [
        await wait_for_status(conn, r, TERMINAL, max(1.0, deadline - time.monotonic()))
        for r in run_ids
    ]


async def stored_problem_and_plan(conn: asyncpg.Connection, run_id: str) -> tuple[Any, Any]:
    """Re-read a finished run's inputs and the job lines now in place, straight from the
    tables (not through the engine's load_problem), so the solver's validator checks the
    plan against an independent reading of the problem."""
    from solver import Plan, Problem

    run = await run_row(conn, run_id)
    ar = run["allocation_run_id"]
    terms = await conn.fetch(
        "select id::text, name, weeks from terms where allocation_run_id = $1 order by ordinal", ar
    )
    demand = await conn.fetch(
        "select team_id::text as team, term_id::text as term, min_lines, max_lines"
        " from team_demand where allocation_run_id = $1", ar,
    )
    team_ids = sorted({d["team"] for d in demand})
    teams = await conn.fetch(
        "select id::text, name, specialty, subspecialty, kind, experiences, site, rural, tags"
        " from teams where id::text = any($1::text[])", team_ids,
    )
    lines = await conn.fetch(
        "select jl.line_number, r.term_id::text as term, r.team_id::text as team"
        " from job_lines jl join rotations r on r.job_line_id = jl.id"
        " where jl.allocation_run_id = $1 order by jl.line_number", ar,
    )
    rotations: dict[int, dict[str, str]] = {}
    for row in lines:
        rotations.setdefault(row["line_number"], {})[row["term"]] = row["team"]
    problem = Problem.model_validate({
        "terms": [dict(t) for t in terms],
        "teams": [{**dict(t), "site": t["site"] or None} for t in teams],
        "demand": [{"team": d["team"], "term": d["term"], "min": d["min_lines"],
                    "max": d["max_lines"]} for d in demand],
        "n_job_lines": run["n_job_lines"],
        "rule_sets": list(run["constraints"]),
    })
    meta = run["result_metadata"] or {}
    if isinstance(meta, str):
        meta = json.loads(meta)
    plan = Plan(status="FEASIBLE",
                lines=[{"line": n, "rotations": r} for n, r in sorted(rotations.items())],
                unfilled=meta.get("unfilled") or [])
    return problem, plan


async def until(
    probe: Callable[[], T | Awaitable[T | None] | None],
    timeout_s: float,
    explain: Callable[[], str] | str,
    interval_s: float = 0.05,
) -> T:
    """The first non-None result of `probe` (sync or async), polled until `timeout_s`; then
    an AssertionError saying what was awaited (`explain`, evaluated only on failure)."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if inspect.isawaitable(got):
            got = await got
        if got is not None:
            return cast(T, got)
        if time.monotonic() > deadline:
            why = explain() if callable(explain) else explain
            raise AssertionError(f"still waiting after {timeout_s}s: {why}")
        await asyncio.sleep(interval_s)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (a listener's solver children), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False
