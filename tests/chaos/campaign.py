"""Fault campaign: break the real product on purpose and count what is lost.

    .venv/bin/python -m tests.chaos.campaign --reps 20      # full campaign (make chaos)
    .venv/bin/python -m tests.chaos.campaign --quick        # 2 repetitions per scenario
    .venv/bin/python -m tests.chaos.campaign --quick --only s1,s7

Why a stack of its own: scenarios restart PostgreSQL, kill the Realtime server and reschedule
the pg_cron sweeper at a 5 s TTL. Other engineers run tests on the developer stack (54329) at
the same time, so the campaign builds a throw-away stack (`PLANNER_DEV_*`-style settings: its
own temp state directory, PostgreSQL on 54349, Realtime on 54350 by default) with exactly the
code path of `planner dev up`, and deletes it at the end.

Nothing is simulated: listeners are `planner listen` subprocesses, runs are inserted as an
organisation's planner (role `authenticated` with JWT claims, as PostgREST does), the solver is
the CP-SAT child process, the sweeper is `planner_engine.sweep_stale_runs` (driven by pg_cron in
scenario 1, by a 2 s loop elsewhere), and every figure is read back from the database.

Each scenario prints one row: repetitions, runs inserted, terminal outcomes, runs stuck in
GENERATING past TTL + one sweep, lost runs, duplicate commits, cross-organisation writes and
the longest time a GENERATING run went without a heartbeat (sampled every 0.25 s), with the
bound that scenario's sweeper configuration promises.

How a commit is counted: every allocation run gets a baseline plan before the campaign, so
every `commit_plan` snapshots the plan it replaces into `job_lines_history` with
`planner_run_id` = the committing run. Commits of a run = its snapshot rows. A COMPLETED run
must have exactly one, any other run none.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from loguru import logger

from devstack import stack
from devstack.postgres import Cluster
from devstack.seed import SeededOrganization, seed_organization
from devstack.settings import DevSettings
from tests.support.databases import GENEROUS_DEFAULT_LIMITS_SQL
from tests.support.harness import (
    TERMINAL,
    ListenerProcess,
    child_pids,
    insert_run,
    listener_env,
)

#: Small but real: 5 terms, VIC_PGY1, 24 lines; CP-SAT searches until its time limit.
SMALL = {"lines": 24, "terms": 5, "teams": 24, "rule_sets": ["VIC_PGY1"]}
#: Mid-solve faults need a search that is still running seconds later: 250 lines x 80 teams
#: searches until its time limit (the small instance is solved to optimality in ~0.1 s).
LARGE = {"lines": 250, "terms": 5, "teams": 80, "rule_sets": ["VIC_PGY1"]}
LARGE_ARS = 16
N_ORGS = 20
ARS_PER_ORG = 5  # allocation runs per organisation (one active run per allocation run)
SWEEP_TTL_S = 5.0  # the test TTL of the sweeper (production: 90 s)
SWEEP_PERIOD_S = 2.0  # the campaign's own sweeper loop (scenarios other than 1)
CRON_PERIOD_S = 60.0  # pg_cron 1.4: one-minute granularity
HEARTBEAT_S = 1.0
DEFAULT_CRON_COMMAND = "select planner_engine.sweep_stale_runs()"
CRON_JOB = "planner-sweep-stale-runs"
QUICK_REPS = 2
#: The giant problem (s8) of the full campaign is the largest the limits admit (seed_giant
#: reads them); the quick version exercises the same path on a problem the solver child
#: builds in seconds (the seed organisation's 5 terms, 500 teams with demand in each).
GIANT_QUICK = {"lines": 30, "teams": 500, "terms": 5, "demand_rows": 2500}
FLOOD_PENDING_TTL_S = 4.0  # s9's pending TTL (production: 30 minutes)


# -- results -----------------------------------------------------------------------------------
@dataclass
class Result:
    """One scenario's figures; `violations` is empty exactly when the pass condition holds."""

    key: str
    title: str
    reps: int
    inserted: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    stuck: int = 0
    lost: int = 0
    duplicate_commits: int = 0
    cross_org_writes: int = 0
    max_gap_s: float = 0.0
    gap_bound_s: float = 0.0
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.violations

    HEADER = ("| scenario | reps | runs | COMPLETED | INFEASIBLE | FAILED | CANCELLED | stuck "
              "| lost | dup. commits | cross-org | max s w/o heartbeat (bound) | wall s | pass |")
    RULE = "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"

    def row(self) -> str:
        o = self.outcomes
        return (f"| {self.key} {self.title} | {self.reps} | {self.inserted} "
                f"| {o.get('COMPLETED', 0)} | {o.get('INFEASIBLE', 0)} | {o.get('FAILED', 0)} "
                f"| {o.get('CANCELLED', 0)} | {self.stuck} | {self.lost} "
                f"| {self.duplicate_commits} | {self.cross_org_writes} "
                f"| {self.max_gap_s:.1f} ({self.gap_bound_s:.0f}) | {self.wall_s:.0f} "
                f"| {'yes' if self.passed else 'NO'} |")


# -- the throw-away stack ----------------------------------------------------------------------
def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as PostgreSQL does
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class ChaosStack:
    """A complete local stack of its own in a temp directory, deleted by `down()`."""

    def __init__(self, pg_port: int, realtime_port: int) -> None:
        for port in (pg_port, realtime_port):
            if not _port_free(port):
                raise RuntimeError(
                    f"port {port} is in use: another campaign running? set "
                    "PLANNER_CHAOS_PG_PORT / PLANNER_CHAOS_REALTIME_PORT")
        self.tmp = Path(tempfile.mkdtemp(prefix="planner-chaos-"))
        self.settings = DevSettings(state_dir=self.tmp / "stack", pg_port=pg_port,
                                    realtime_port=realtime_port)
        self.realtime = stack.RealtimeProcess(self.settings)
        self.cluster = Cluster(self.settings)

    def up(self) -> None:
        stack.up(self.settings)

    def down(self) -> None:
        with contextlib.suppress(Exception):
            stack.down(self.settings)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def kill_realtime(self) -> None:
        """SIGKILL the Realtime server (no goodbye frames) and reap it."""
        pid = self.realtime.pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def restart_postgres(self) -> float:
        """`pg_ctl stop -m fast` then start; returns the seconds PostgreSQL was down."""
        t0 = time.monotonic()
        self.cluster.stop("fast")
        self.cluster.start()
        return time.monotonic() - t0


# -- the world: organisations, allocation runs with a baseline plan ----------------------------
@dataclass(frozen=True)
class Slot:
    """One allocation run of one organisation: holds at most one active planner run."""

    org: SeededOrganization
    allocation_run_id: str


async def _clone_allocation_run(conn: asyncpg.Connection, org_id: str, source: str, k: int) -> str:
    new = str(await conn.fetchval(
        "insert into allocation_runs (organization_id, name, description)"
        " select organization_id, name || $2, description from allocation_runs where id = $1"
        " returning id", source, f" #{k}"))
    await conn.execute(
        "insert into terms (organization_id, allocation_run_id, ordinal, name, weeks, starts_on)"
        " select organization_id, $2, ordinal, name, weeks, starts_on from terms"
        " where allocation_run_id = $1", source, new)
    await conn.execute(
        "insert into team_demand (organization_id, allocation_run_id, team_id, term_id,"
        " min_lines, max_lines)"
        " select d.organization_id, $2, d.team_id, t2.id, d.min_lines, d.max_lines"
        " from team_demand d join terms t1 on t1.id = d.term_id"
        " join terms t2 on t2.allocation_run_id = $2 and t2.ordinal = t1.ordinal"
        " where d.allocation_run_id = $1", source, new)
    return new


async def _baseline_plan(conn: asyncpg.Connection, org_id: str, ar: str, n_lines: int) -> None:
    """Commit a simple complete plan through the engine, so later commits leave snapshots."""
    terms = [r["id"] for r in await conn.fetch(
        "select id::text from terms where allocation_run_id = $1 order by ordinal", ar)]
    by_term: dict[str, list[str]] = {}
    for r in await conn.fetch("select term_id::text as term, team_id::text as team"
                              " from team_demand where allocation_run_id = $1 and max_lines > 0"
                              " order by team_id", ar):
        by_term.setdefault(r["term"], []).append(r["team"])
    lines = [{"line": i, "rotations": {t: by_term[t][i % len(by_term[t])] for t in terms},
              "pinned": []} for i in range(1, n_lines + 1)]
    run = await conn.fetchval(
        "insert into allocation_planner_runs (organization_id, allocation_run_id, n_job_lines)"
        " values ($1, $2, $3) returning id", org_id, ar, n_lines)
    lease = await conn.fetchval("select lease from planner_engine.claim_run('baseline', $1)", run)
    await conn.execute("select planner_engine.commit_plan($1, $2, $3, $4::jsonb, '{}')",
                       run, lease, org_id, json.dumps({"lines": lines}))


async def build_world(conn: asyncpg.Connection, settings: DevSettings) -> list[Slot]:
    """20 small organisations x 5 allocation runs, then LARGE_ARS allocation runs of one
    large organisation (returned last; `Campaign.large` holds them)."""
    slots: list[Slot] = []
    for i in range(N_ORGS):
        org = await seed_organization(conn, settings, f"Chaos Health {i}", instance_seed=i,
                                      **SMALL)  # type: ignore[arg-type]
        ars = [org.allocation_run_id] + [
            await _clone_allocation_run(conn, org.id, org.allocation_run_id, k)
            for k in range(1, ARS_PER_ORG)]
        slots += [Slot(org, ar) for ar in ars]
    big = await seed_organization(conn, settings, "Chaos Large", instance_seed=99,
                                  **LARGE)  # type: ignore[arg-type]
    slots += [Slot(big, ar) for ar in [big.allocation_run_id] + [
        await _clone_allocation_run(conn, big.id, big.allocation_run_id, k)
        for k in range(1, LARGE_ARS)]]
    # The campaign inserts hundreds of runs; the hourly limit has its own tests (tests/db).
    await conn.execute(GENEROUS_DEFAULT_LIMITS_SQL, 1000000)
    # no run solves longer than 10 s (the cap is the database's: planner_engine.limits)
    await conn.execute("update planner_engine.limits set max_time_limit_s = 10"
                       " where tier = 'default'")
    for s in slots:
        await _baseline_plan(conn, s.org.id, s.allocation_run_id, s.org.suggested_n_job_lines)
    return slots


# -- helpers shared by the scenarios -----------------------------------------------------------
async def _connect(dsn: str, timeout_s: float = 60.0) -> asyncpg.Connection:
    """Connect, retrying while PostgreSQL restarts."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Run:
    """A scenario in progress: its runs, listeners, sweeper and heartbeat sampler."""

    def __init__(self, campaign: Campaign, result: Result) -> None:
        self.c = campaign
        self.r = result
        self.ids: list[str] = []
        self.listeners: list[ListenerProcess] = []
        self.started_db: Any = None
        self.max_gap = 0.0
        self.max_per_worker = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._starts = 0

    # listeners
    def listener(self, name: str, **env: str | float | int) -> ListenerProcess:
        self._starts += 1
        wid = f"{self.r.key}-{name}-{self._starts}"
        e = listener_env(self.c.settings, self.c.settings.database, self.c.settings.supabase_url,
                         PLANNER_HEARTBEAT_INTERVAL_S=HEARTBEAT_S,
                         PLANNER_SHUTDOWN_GRACE_S=1, **env)
        proc = ListenerProcess(e, self.c.log_dir / f"{wid}.log", worker_id=wid).start()
        self.listeners.append(proc)
        return proc

    def alive(self) -> list[ListenerProcess]:
        return [p for p in self.listeners if p.proc is not None and p.proc.poll() is None]

    # runs
    async def insert(self, options: dict[str, Any], slot: Slot | None = None,
                     large: bool = False) -> str:
        """Insert a run as the organisation's planner on a slot with no active run
        (`large`: on the large organisation, for faults that must hit a running search)."""
        deadline = time.monotonic() + 120
        pool = self.c.large if large else self.c.small
        while True:
            candidates = [slot] if slot else self.c.rnd.sample(pool, len(pool))
            for s in candidates:
                try:
                    run_id = await insert_run(
                        self.c.db, user_id=s.org.planner.id, organization_id=s.org.id,
                        allocation_run_id=s.allocation_run_id,
                        n_job_lines=s.org.suggested_n_job_lines,
                        constraints=s.org.suggested_constraints, options=options)
                except asyncpg.PostgresError as exc:
                    if exc.sqlstate == "PL013":  # this allocation run is busy; try another
                        continue
                    raise
                self.ids.append(run_id)
                return run_id
            if time.monotonic() > deadline:
                raise AssertionError("no free allocation run for 120 s")
            await asyncio.sleep(0.2)

    async def row(self, run_id: str) -> dict[str, Any]:
        return dict(await self.c.q().fetchrow(
            "select * from allocation_planner_runs where id = $1", run_id))

    async def wait_status(self, run_id: str, statuses: set[str] | frozenset[str],
                          timeout_s: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                row = await self.row(run_id)
                if row["status"] in statuses:
                    return row
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} not in {statuses} after {timeout_s}s")
            await asyncio.sleep(0.1)

    async def wait_generating_by(self, worker_id: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rid = await self.c.q().fetchval(
                "select id::text from allocation_planner_runs"
                " where status = 'GENERATING' and worker_id = $1", worker_id)
            if rid:
                return str(rid)
            await asyncio.sleep(0.05)
        raise AssertionError(f"{worker_id} claimed nothing in {timeout_s}s")

    # background: sweeper loop and heartbeat sampler
    def start_background(self, sweeper: bool) -> None:
        self._tasks.append(asyncio.create_task(self._sample()))
        if sweeper:
            self._tasks.append(asyncio.create_task(self._sweep()))

    async def _bounded(self, sql: str, *args: Any) -> Any:
        """One statement on a fresh connection, everything bounded in time: a loop that must
        survive PostgreSQL restarts and lock waits may never hang on a dead socket."""
        conn = await asyncio.wait_for(asyncpg.connect(self.c.dsn, timeout=5), 6)
        try:
            return await asyncio.wait_for(conn.fetchrow(sql, *args), 10)
        finally:
            conn.terminate()

    async def _sweep(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                await self._bounded("select planner_private.sweep_stale_runs($1::text::interval)",
                                    f"{SWEEP_TTL_S} seconds")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), SWEEP_PERIOD_S)

    async def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                gap, per_worker = await self._bounded(
                    "select (select coalesce(max(extract(epoch from clock_timestamp()"
                    "                                    - heartbeat_at)), 0)::float8"
                    "          from allocation_planner_runs"
                    "         where status = 'GENERATING' and created_at >= $1),"
                    "       (select coalesce(max(n), 0) from (select count(*) n"
                    "          from allocation_planner_runs where status = 'GENERATING'"
                    "           and heartbeat_at > clock_timestamp() - $2::float8"
                    "                                * interval '1 second'"
                    "         group by worker_id) x)", self.started_db, 2 * HEARTBEAT_S + 1)
                self.max_gap = max(self.max_gap, float(gap))
                self.max_per_worker = max(self.max_per_worker, int(per_worker))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.25)

    async def stop_background(self) -> None:
        self._stop.set()
        for t in self._tasks:
            with contextlib.suppress(Exception):
                await t

    # the end: settle, account, check
    async def settle(self, timeout_s: float) -> None:
        """Wait (with live listeners) until every run of the scenario is terminal."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                left = await self.c.q().fetchval(
                    "select count(*) from allocation_planner_runs"
                    " where id = any($1::uuid[]) and status not in"
                    " ('COMPLETED','INFEASIBLE','FAILED','CANCELLED')", self.ids)
                if left == 0:
                    return
            await asyncio.sleep(0.25)

    async def account(self, *, ttl_s: float, sweep_period_s: float, extra_bound_s: float = 0.0,
                      expect_all: str | None = None) -> None:
        r, db = self.r, self.c.q()
        r.inserted = len(self.ids)
        rows = await db.fetch(
            "select id::text, status, attempts, error,"
            " extract(epoch from now() - heartbeat_at)::float8 as since_beat"
            " from allocation_planner_runs where id = any($1::uuid[])", self.ids)
        if len(rows) != len(self.ids):
            r.lost += len(self.ids) - len(rows)
            r.violations.append(f"{len(self.ids) - len(rows)} run row(s) vanished")
        for row in rows:
            st = row["status"]
            r.outcomes[st] = r.outcomes.get(st, 0) + 1
            if st == "GENERATING" and (row["since_beat"] or 0) > ttl_s:
                r.stuck += 1
            elif st not in TERMINAL:
                # settle() waited minutes with live listeners: a run still open is lost.
                r.lost += 1
        if r.stuck:
            r.violations.append(f"{r.stuck} run(s) stuck in GENERATING past the TTL")
        if r.lost:
            r.violations.append(f"{r.lost} run(s) never reached a terminal state")
        if expect_all:
            other = {k: v for k, v in r.outcomes.items() if k != expect_all}
            if other:
                r.violations.append(f"expected every run {expect_all}, got {r.outcomes}")
        commits = {row["id"]: row["n"] for row in await db.fetch(
            "select planner_run_id::text as id, count(*) as n from job_lines_history"
            " where planner_run_id = any($1::uuid[]) group by 1", self.ids)}
        for row in rows:
            n = commits.get(row["id"], 0)
            if row["status"] == "COMPLETED" and n != 1:
                r.duplicate_commits += max(0, n - 1)
                if n == 0:
                    r.violations.append(f"COMPLETED run {row['id']} left no commit")
            elif row["status"] != "COMPLETED" and n:
                r.duplicate_commits += n
                r.violations.append(f"{row['status']} run {row['id']} wrote a plan")
        if r.duplicate_commits:
            r.violations.append(f"{r.duplicate_commits} duplicate/zombie commit(s)")
        # The plan in place is the last completed run's, whole (no half or mixed writes).
        mixed = await db.fetchval(
            "select count(*) from (select jl.allocation_run_id from job_lines jl"
            "  where jl.allocation_run_id in (select allocation_run_id"
            "    from allocation_planner_runs where id = any($1::uuid[]))"
            "  group by 1 having count(distinct jl.planner_run_id) > 1) x", self.ids)
        if mixed:
            r.violations.append(f"{mixed} allocation run(s) hold lines of several runs")
        r.cross_org_writes = await cross_org_writes(db)
        if r.cross_org_writes:
            r.violations.append(f"{r.cross_org_writes} cross-organisation row(s)")
        r.max_gap_s = self.max_gap
        r.gap_bound_s = ttl_s + sweep_period_s + HEARTBEAT_S + 3.0 + extra_bound_s
        if self.max_gap > r.gap_bound_s:
            r.violations.append(
                f"a GENERATING run went {self.max_gap:.1f}s without heartbeat"
                f" (bound {r.gap_bound_s:.0f}s)")
        self.check_one_solve_at_a_time()

    def check_one_solve_at_a_time(self) -> None:
        """From each listener's own log: a claim never happens while another run is open."""
        overlaps = 0
        for proc in self.listeners:
            open_run: str | None = None
            for rec in proc.records():
                msg, rid = rec.get("message", ""), rec.get("planner_run_id")
                if msg.startswith("run claimed"):
                    if open_run is not None and open_run != rid:
                        overlaps += 1
                    open_run = rid
                elif msg.startswith("run finished") and rid == open_run:
                    open_run = None
        # The logs are exact. The DB sample (GENERATING runs per worker with a recent
        # heartbeat) is only reported: an orphan whose commit a PostgreSQL restart cut still
        # has a fresh heartbeat for a moment while its listener claims the next run.
        if self.max_per_worker > 1:
            self.r.notes.append(f"DB sample: up to {self.max_per_worker} GENERATING runs with"
                                " a recent heartbeat for one worker id")
        if overlaps:
            self.r.violations.append(
                f"two solves at once inside one listener ({overlaps} overlapping claims in"
                " its log)")

    async def close(self) -> None:
        await self.stop_background()
        for p in self.listeners:
            await asyncio.to_thread(p.stop_now)


async def cross_org_writes(db: asyncpg.Connection) -> int:
    """Rows whose organisation differs from their run's, line's, team's or term's (all tables
    the engine writes). The composite foreign keys forbid them; the campaign still counts."""
    return int(await db.fetchval("""
        select (select count(*) from job_lines jl join allocation_planner_runs r
                  on r.id = jl.planner_run_id
                 where r.organization_id <> jl.organization_id
                    or r.allocation_run_id <> jl.allocation_run_id)
             + (select count(*) from rotations ro join teams t on t.id = ro.team_id
                 where t.organization_id <> ro.organization_id)
             + (select count(*) from rotations ro join terms t on t.id = ro.term_id
                 where t.allocation_run_id <> ro.allocation_run_id)
             + (select count(*) from rotations ro join job_lines jl on jl.id = ro.job_line_id
                 where jl.organization_id <> ro.organization_id
                    or jl.allocation_run_id <> ro.allocation_run_id)
             + (select count(*) from job_lines_history h join allocation_planner_runs r
                  on r.id = h.planner_run_id
                 where r.organization_id <> h.organization_id
                    or r.allocation_run_id <> h.allocation_run_id)
             + (select count(*) from planner_execution_logs l join allocation_planner_runs r
                  on r.id = l.planner_run_id where r.organization_id <> l.organization_id)
    """))


# -- the campaign ------------------------------------------------------------------------------
Scenario = Callable[["Campaign", Run, int], Awaitable[None]]


class Campaign:
    def __init__(self, chaos: ChaosStack, seed: int) -> None:
        self.stack = chaos
        self.settings = chaos.settings
        self.dsn = chaos.settings.dsn()
        self.rnd = random.Random(seed)
        self.log_dir = chaos.tmp / "logs"
        self.slots: list[Slot] = []
        self.small: list[Slot] = []
        self.large: list[Slot] = []
        self.db: asyncpg.Connection = None  # type: ignore[assignment]

    def q(self) -> asyncpg.Connection:
        return self.db

    async def reconnect(self) -> None:
        with contextlib.suppress(Exception):
            await self.db.close()
        self.db = await _connect(self.dsn)

    async def setup(self) -> None:
        await asyncio.to_thread(self.stack.up)
        self.db = await _connect(self.dsn)
        self.slots = await build_world(self.db, self.settings)
        self.small = self.slots[:N_ORGS * ARS_PER_ORG]
        self.large = self.slots[N_ORGS * ARS_PER_ORG:]

    async def set_cron_ttl(self, ttl: str | None) -> None:
        command = (DEFAULT_CRON_COMMAND if ttl is None
                   else f"select planner_private.sweep_stale_runs('{ttl}')")
        await self.q().execute("select cron.schedule($1, '* * * * *', $2)", CRON_JOB, command)

    async def run(self, key: str, reps: int) -> Result:
        title, fn, sweeper = SCENARIOS[key]
        result = Result(key, title, reps)
        if self.db.is_closed():
            await self.reconnect()
        r = Run(self, result)
        r.started_db = await self.q().fetchval("select clock_timestamp()")
        t0 = time.monotonic()
        r.start_background(sweeper=sweeper)
        try:
            await fn(self, r, reps)
        except Exception as exc:  # a scenario that cannot finish its script is a failure too
            result.violations.append(f"scenario aborted: {type(exc).__name__}: {exc}")
            if self.db.is_closed():
                await self.reconnect()
            await r.settle(60)
            await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=CRON_PERIOD_S)
        finally:
            await r.close()
        result.wall_s = time.monotonic() - t0
        return result


# -- scenarios ---------------------------------------------------------------------------------
async def s1_kill9(c: Campaign, r: Run, reps: int) -> None:
    """kill -9 the listener mid-solve and restart it at once; only pg_cron (every minute,
    5 s TTL) rescues the orphaned runs. Kills come faster than cron ticks, so rescues of many
    repetitions overlap instead of costing a minute each."""
    await c.set_cron_ttl(f"{SWEEP_TTL_S:.0f} seconds")
    jobid = await c.q().fetchval("select jobid from cron.job where jobname = $1", CRON_JOB)
    try:
        victim = r.listener("L")
        await victim.wait_ready()
        hit = 0
        for _ in range(reps):
            await r.insert({"time_limit_seconds": 4}, large=True)
            rid = await r.wait_generating_by(victim.worker_id)
            await asyncio.sleep(c.rnd.uniform(0.3, 2.5))
            hit += (await r.row(rid))["status"] == "GENERATING"
            victim.kill()
            await victim.wait()
            victim = r.listener("L")
            await victim.wait_ready()
        await r.settle(timeout_s=240)
        runs = await c.q().fetchval(
            "select count(*) from cron.job_run_details where jobid = $1 and status = 'succeeded'"
            " and start_time >= $2", jobid, r.started_db)
        rescued = await c.q().fetchval(
            "select count(distinct planner_run_id) from planner_execution_logs"
            " where planner_run_id = any($1::uuid[]) and message like 'Timeout:%'"
            " and (context->>'ttl_seconds')::float = $2", r.ids, SWEEP_TTL_S)
        r.r.notes.append(f"{hit}/{reps} kills hit a running solve; pg_cron ran {runs} time(s)"
                         f" and rescued {rescued} run(s)")
        if rescued < 1:
            r.r.violations.append("pg_cron rescued no run")
        await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=CRON_PERIOD_S)
    finally:
        await c.set_cron_ttl(None)


async def s2_sigterm(c: Campaign, r: Run, reps: int) -> None:
    """SIGTERM the listener that holds a run mid-solve while a second listener runs: the run
    is handed back (PENDING, attempt returned) and the other listener completes it."""
    procs = {n: r.listener(n) for n in ("A", "B")}
    for p in procs.values():
        await p.wait_ready()
    exits: list[int] = []
    for _ in range(reps):
        rid = await r.insert({"time_limit_seconds": 4}, large=True)
        row = await r.wait_status(rid, {"GENERATING", *TERMINAL})
        await asyncio.sleep(c.rnd.uniform(0.2, 2.5))
        name = next((n for n, p in procs.items() if p.worker_id == row["worker_id"]), None)
        if name is None:
            continue
        procs[name].terminate()
        exits.append(await procs[name].wait(timeout_s=30))
        procs[name] = r.listener(name)
        await procs[name].wait_ready()
    await r.settle(timeout_s=120)
    r.r.notes.append(f"{len(exits)} SIGTERMs, exit codes {sorted(set(exits))}")
    if any(exits):
        r.r.violations.append(f"a listener exited non-zero on SIGTERM: {exits}")
    await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=SWEEP_PERIOD_S)


async def s3_realtime(c: Campaign, r: Run, reps: int) -> None:
    """SIGKILL the Realtime server while runs are being inserted, restart it after a random
    outage; the catch-up scan must find every run whose event was lost."""
    for n in ("A", "B"):
        await r.listener(n).wait_ready()
    outages: list[float] = []
    for _ in range(reps):
        times = sorted(c.rnd.uniform(0, 1.5) for _ in range(3))
        kill_at, down_s = c.rnd.uniform(0, 1.5), c.rnd.uniform(0.5, 3.0)

        async def inserts(times: list[float] = times) -> None:
            t0 = time.monotonic()
            for t in times:
                await asyncio.sleep(max(0.0, t - (time.monotonic() - t0)))
                await r.insert({"time_limit_seconds": 1})

        async def outage(kill_at: float = kill_at, down_s: float = down_s) -> None:
            await asyncio.sleep(kill_at)
            c.stack.kill_realtime()
            await asyncio.sleep(down_s)
            t0 = time.monotonic()
            await asyncio.to_thread(c.stack.realtime.start, 60.0)
            outages.append(down_s + time.monotonic() - t0)

        await asyncio.gather(inserts(), outage())
    await r.settle(timeout_s=180)
    r.r.notes.append(f"{reps} Realtime kills, outage {min(outages):.1f}-{max(outages):.1f} s")
    await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=SWEEP_PERIOD_S, expect_all="COMPLETED")


async def _listener_waits_on_lock(c: Campaign, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        n = await c.q().fetchval(
            "select count(*) from pg_stat_activity where application_name = 'planner-listener'"
            " and wait_event_type = 'Lock' and query like '%commit_plan%'")
        if n:
            return True
        await asyncio.sleep(0.05)
    return False


async def s4_postgres(c: Campaign, r: Run, reps: int) -> None:
    """Restart PostgreSQL (fast shutdown: every session is cut) mid-solve and mid-commit.
    Mid-commit is made certain, not lucky: `job_lines` is locked from another session so
    `commit_plan` is caught inside its transaction when the server goes down."""
    lst = r.listener("L")
    await lst.wait_ready()
    downs: list[float] = []
    modes = {"mid-solve": 0, "mid-commit": 0}
    for i in range(reps):
        mode = "mid-commit" if i % 2 else "mid-solve"
        rid = await r.insert({"time_limit_seconds": 3 if mode == "mid-solve" else 2},
                             large=True)
        await r.wait_status(rid, {"GENERATING", *TERMINAL}, timeout_s=120)
        locker: asyncpg.Connection | None = None
        if mode == "mid-solve":
            await asyncio.sleep(c.rnd.uniform(0.2, 2.5))
        else:
            await asyncio.sleep(0.8)  # past load_problem, which reads job_lines
            locker = await _connect(c.dsn)
            tx = locker.transaction()
            await tx.start()
            await locker.execute("lock table public.job_lines in access exclusive mode")
            if not await _listener_waits_on_lock(c, 60):
                r.r.notes.append("a mid-commit repetition found no blocked commit")
            await asyncio.sleep(c.rnd.uniform(0.0, 1.0))
        modes[mode] += 1
        await c.db.close()
        downs.append(await asyncio.to_thread(c.stack.restart_postgres))
        if locker is not None:
            with contextlib.suppress(Exception):
                await locker.close()
        await c.reconnect()
        await lst.wait_ready(timeout_s=60)
    await r.settle(timeout_s=180)
    r.r.notes.append(f"{modes['mid-solve']} restarts mid-solve, {modes['mid-commit']} mid-commit;"
                     f" PostgreSQL down {min(downs):.1f}-{max(downs):.1f} s")
    await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=SWEEP_PERIOD_S,
                    extra_bound_s=max(downs) + 1.0)


async def s5_burst(c: Campaign, r: Run, reps: int) -> None:
    """Three listeners, bursts of runs from all 20 organisations (round robin, 5 allocation
    runs each): each run solved exactly once, one solve at a time per listener, no
    organisation starved (each one's first run is claimed among the first claims)."""
    per_org = ARS_PER_ORG if reps > QUICK_REPS else 1  # full: the 100-run burst
    bursts = 1
    for n in ("A", "B", "C"):
        await r.listener(n).wait_ready()
    by_org: dict[str, list[Slot]] = {}
    for s in c.small:
        by_org.setdefault(s.org.id, []).append(s)
    starved = 0
    worst_wait = 0.0
    for _ in range(bursts):
        burst: list[str] = []
        for k in range(per_org):
            for slots in by_org.values():
                burst.append(await r.insert({"time_limit_seconds": 1}, slot=slots[k]))
        await r.settle(timeout_s=600)
        rows = await c.q().fetch(
            "select id::text, organization_id::text as org, claimed_at, created_at"
            " from allocation_planner_runs where id = any($1::uuid[]) order by claimed_at",
            burst)
        first_rank: dict[str, int] = {}
        for rank, row in enumerate(rows):
            first_rank.setdefault(row["org"], rank)
            if row["claimed_at"] is not None:
                worst_wait = max(worst_wait,
                                 (row["claimed_at"] - row["created_at"]).total_seconds())
        starved += sum(1 for rank in first_rank.values() if rank >= 2 * len(by_org))
        starved += len(by_org) - len(first_rank)
    claims: dict[str, int] = {}
    for p in r.listeners:
        for rec in p.records():
            if rec.get("message", "").startswith("run claimed"):
                claims[rec["planner_run_id"]] = claims.get(rec["planner_run_id"], 0) + 1
    reclaimed = sum(1 for rid in r.ids if claims.get(rid, 0) != 1)
    workers = await c.q().fetchval(
        "select count(distinct (result_metadata->>'worker_id')) from allocation_planner_runs"
        " where id = any($1::uuid[])", r.ids)
    r.r.notes.append(
        f"{bursts} burst(s) of {per_org * len(by_org)} runs from {len(by_org)} organisations;"
        f" {workers} listeners completed runs; {reclaimed} run(s) claimed more than once;"
        f" longest wait insert->claim {worst_wait:.0f} s; starved organisations: {starved}")
    if starved:
        r.r.violations.append(f"{starved} organisation(s) starved")
    if reclaimed:
        r.r.violations.append(f"{reclaimed} run(s) not claimed exactly once")
    await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=SWEEP_PERIOD_S, expect_all="COMPLETED")


async def _healthy_after(r: Run, lst: ListenerProcess) -> bool:
    status, body = await asyncio.to_thread(lst.readiness)
    return status == 200 and body.get("database") is True


async def s6_solver_child(c: Campaign, r: Run, reps: int) -> None:
    """The solver child dies of its memory cap (listener with an 80 MiB cap) or is killed
    (SIGSEGV / SIGKILL from outside) mid-solve: the run is FAILED with a readable error and a
    log row, the listener stays ready and completes the next normal run."""
    n_mem = max(1, reps // 2)
    mem = r.listener("M", PLANNER_SOLVER_MEMORY_MB=80)
    await mem.wait_ready()
    unreadable = unhealthy = 0
    for _ in range(n_mem):
        rid = await r.insert({"time_limit_seconds": 2})
        row = await r.wait_status(rid, TERMINAL, timeout_s=60)
        unreadable += not (row["status"] == "FAILED" and "memory" in (row["error"] or ""))
        unhealthy += not await _healthy_after(r, mem)
    mem.terminate()
    mem_exit = await mem.wait()
    ok = r.listener("K")
    await ok.wait_ready()
    kills = 0
    for i in range(reps - n_mem):
        rid = await r.insert({"time_limit_seconds": 5}, large=True)
        await r.wait_status(rid, {"GENERATING"}, timeout_s=60)
        deadline = time.monotonic() + 10
        assert ok.proc is not None
        while not child_pids(ok.proc.pid) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # the child starts after load_problem; poll /proc
        await asyncio.sleep(c.rnd.uniform(0.2, 2.0))
        for pid in child_pids(ok.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSEGV if i % 2 == 0 else signal.SIGKILL)
                kills += 1
        row = await r.wait_status(rid, TERMINAL, timeout_s=60)
        unreadable += not (row["status"] == "FAILED" and "solver" in (row["error"] or ""))
        nxt = await r.insert({"time_limit_seconds": 1})
        row = await r.wait_status(nxt, TERMINAL, timeout_s=60)
        unhealthy += row["status"] != "COMPLETED" or not await _healthy_after(r, ok)
    logged = await c.q().fetchval(
        "select count(distinct planner_run_id) from planner_execution_logs"
        " where planner_run_id = any($1::uuid[]) and level = 'ERROR'"
        " and message like '%solver%'", r.ids)
    failed = await c.q().fetchval(
        "select count(*) from allocation_planner_runs where id = any($1::uuid[])"
        " and status = 'FAILED'", r.ids)
    errors = [e for (e,) in await c.q().fetch(
        "select distinct split_part(error, ';', 1) from allocation_planner_runs"
        " where id = any($1::uuid[]) and status = 'FAILED'", r.ids)]
    r.r.notes.append(f"{n_mem} memory-cap deaths, {kills} child kills; errors: {errors};"
                     f" {logged}/{failed} failed runs have an ERROR log row naming the solver;"
                     f" memory-capped listener exit code {mem_exit}")
    if unreadable:
        r.r.violations.append(f"{unreadable} run(s) without a readable solver error")
    if unhealthy:
        r.r.violations.append(f"listener unhealthy or next run not completed {unhealthy} time(s)")
    if logged != failed or mem_exit != 0:
        r.r.violations.append("missing error log rows or unclean listener exit")
    await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=SWEEP_PERIOD_S)


async def s7_slow_db(c: Campaign, r: Run, reps: int) -> None:
    """A commit slower than the heartbeat TTL, with the sweeper (TTL 2 s) running against it.
    Three orders, by repetition: commit blocked on a `job_lines` lock (it holds the run row);
    commit blocked on a run-row lock, then the sweeper queues behind it; the sweeper queued on
    the run row *before* the solve ends, so it wins and the commit must find its lease gone."""
    ttl = 2.0
    lst = r.listener("L")
    await lst.wait_ready()
    sweeper_conn = await _connect(c.dsn)
    # Sweeper-first second, so the quick version (2 repetitions) covers both winners.
    orders = {"commit-first/job_lines": 0, "sweeper-first/row": 0, "commit-first/row": 0}
    requeued = 0
    holds: list[float] = []
    try:
        for i in range(reps):
            mode = list(orders)[i % 3]
            limit = 4 if mode == "sweeper-first/row" else 2
            rid = await r.insert({"time_limit_seconds": limit}, large=True)
            await r.wait_status(rid, {"GENERATING"}, timeout_s=120)
            await asyncio.sleep(0.8)
            locker = await _connect(c.dsn)
            tx = locker.transaction()
            await tx.start()
            t_lock = time.monotonic()
            if mode == "commit-first/job_lines":
                await locker.execute("lock table public.job_lines in access exclusive mode")
            else:
                await locker.execute(
                    "select 1 from allocation_planner_runs where id = $1 for update", rid)
            if mode == "sweeper-first/row":
                await asyncio.sleep(ttl + 0.5)  # the heartbeat is blocked: stale now
                sweep = asyncio.create_task(sweeper_conn.fetchval(
                    "select planner_private.sweep_stale_runs($1::text::interval)",
                    f"{ttl} seconds"))
                await asyncio.sleep(0.3)
                blocked = await _listener_waits_on_lock(c, 60)  # the commit queues after it
            else:
                blocked = await _listener_waits_on_lock(c, 60)
                await asyncio.sleep(ttl + 0.5)
                sweep = asyncio.create_task(sweeper_conn.fetchval(
                    "select planner_private.sweep_stale_runs($1::text::interval)",
                    f"{ttl} seconds"))
            await asyncio.sleep(c.rnd.uniform(0.3, 1.5))
            await tx.rollback()
            holds.append(time.monotonic() - t_lock)
            await locker.close()
            await sweep
            orders[mode] += blocked
            row = await r.wait_status(rid, TERMINAL, timeout_s=120)
            requeued += row["attempts"] > 1
    finally:
        await sweeper_conn.close()
    await r.settle(timeout_s=60)
    r.r.notes.append(f"commits blocked longer than the {ttl:.0f} s TTL: {orders};"
                     f" locks held {min(holds):.1f}-{max(holds):.1f} s;"
                     f" {requeued} run(s) re-queued by the sweeper and solved again")
    if sum(orders.values()) < reps:
        r.r.violations.append("some repetitions did not block the commit")
    await r.account(ttl_s=ttl, sweep_period_s=0.0, extra_bound_s=max(holds),
                    expect_all="COMPLETED")


async def beats(dsn: str, sql: str, arg: str, stop: asyncio.Event) -> list[Any]:
    """The distinct values `sql` ($1 = arg) returns, sampled every 50 ms until `stop`: the
    timestamps of successive heartbeats (also used by bench/flood_bench.py)."""
    seen: list[Any] = []
    conn = await _connect(dsn)
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncpg.PostgresError):
                v = await conn.fetchval(sql, arg)
                if v is not None and (not seen or v != seen[-1]):
                    seen.append(v)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    finally:
        await conn.close()
    return seen


def longest_gap(stamps: list[Any]) -> float:
    return max((float((b - a).total_seconds()) for a, b in itertools.pairwise(stamps)),
               default=0.0)


@dataclasses.dataclass(frozen=True)
class GiantSize:
    """A problem's size as the admission checks count it (planner_private.admission_checks):
    job lines requested, teams (with demand, or in the plan), terms and team_demand rows of
    the allocation run."""

    lines: int
    teams: int
    terms: int
    demand_rows: int

    def __str__(self) -> str:
        return (f"{self.lines} lines x {self.teams} teams, {self.terms} terms,"
                f" {self.demand_rows} demand rows")


async def admitted_size(conn: asyncpg.Connection, org_id: str) -> GiantSize:
    """The largest problem the limits admit for this organisation (planner_private.limits_of:
    its own row, else its tier's, else the default row)."""
    lim = await conn.fetchrow(
        "select max_job_lines, max_teams, max_terms, max_demand_rows"
        " from planner_private.limits_of($1)", org_id)
    return GiantSize(lines=lim["max_job_lines"], teams=lim["max_teams"],
                     terms=lim["max_terms"], demand_rows=lim["max_demand_rows"])


async def problem_size(conn: asyncpg.Connection, ar: str, lines: int) -> GiantSize:
    """What the admission checks count on allocation run `ar` (the same queries, unbounded)."""
    row = await conn.fetchrow(
        "select (select count(*) from terms where allocation_run_id = $1) as terms,"
        " (select count(*) from team_demand where allocation_run_id = $1) as demand_rows,"
        " (select count(*) from (select team_id from team_demand where allocation_run_id = $1"
        "  union select ro.team_id from job_lines l join rotations ro on ro.job_line_id = l.id"
        "  where l.allocation_run_id = $1) x) as teams", ar)
    return GiantSize(lines=lines, teams=row["teams"], terms=row["terms"],
                     demand_rows=row["demand_rows"])


async def seed_giant(
    conn: asyncpg.Connection, settings: DevSettings,
    smaller: Callable[[GiantSize], GiantSize] | None = None,
) -> tuple[SeededOrganization, GiantSize]:
    """An organisation whose one allocation run is the largest problem its limits admit:
    max_terms terms, max_teams teams and max_demand_rows demand rows spread so that every
    term and every team has demand (diagonals of the teams x terms grid: as many terms per
    team as max_demand_rows allows), and a request of max_job_lines lines. The sizes are read
    from planner_private.limits_of, so they follow whatever the database applies to that
    organisation; `smaller` maps the limits to a smaller problem (the quick campaign, a
    benchmark's option), and a value above the limit raises ValueError (one line). Built
    set-based (seeding teams one by one would take minutes); the counts are checked
    afterwards with the admission's own queries. Also used by bench/flood_bench.py."""
    # No rule set: VIC_PGY1 is for a 5-term year and would fail the validation of any other
    # number of terms before the problem reaches the solver child, which is the point.
    org = await seed_organization(conn, settings, "Giant", instance_seed=77,
                                  **{**SMALL, "rule_sets": []})  # type: ignore[arg-type]
    limit = await admitted_size(conn, org.id)
    want = limit
    if smaller is not None:
        cap = smaller(limit)
        above = [f"{k} {getattr(cap, k)} > {getattr(limit, k)}"
                 for k in ("lines", "teams", "terms", "demand_rows")
                 if getattr(cap, k) > getattr(limit, k)]
        if above:
            raise ValueError(f"the limits admit at most {limit}: {', '.join(above)}")
        want = cap
    ar = org.allocation_run_id
    # every team of the organisation gets demand below, so count them all
    have = dataclasses.replace(await problem_size(conn, ar, want.lines), teams=int(
        await conn.fetchval("select count(*) from teams where organization_id = $1", org.id)))
    if have.teams > want.teams or have.terms > want.terms or have.demand_rows > want.demand_rows:
        raise ValueError(f"the seed organisation alone ({have}) exceeds {want}")
    await conn.execute(
        "insert into terms (organization_id, allocation_run_id, ordinal, name, weeks)"
        " select $1, $2, g, 'giant term ' || g, 1 from generate_series($3::int, $4::int) g",
        org.id, ar, have.terms + 1, want.terms)
    await conn.execute(
        "insert into teams (organization_id, name, specialty, subspecialty, kind, experiences,"
        " site, rural, tags)"
        " select $1, 'giant team ' || g, 'medicine', 'sub ' || (g % 50), 'clinical',"
        " array['A'], 'MMC', false, '{}' from generate_series(1, $2::int) g",
        org.id, want.teams - have.teams)
    # Diagonal d of the grid pairs team k with term (d - k) mod T: each diagonal gives every
    # team one more term and spreads the rows evenly over the terms.
    await conn.execute(
        "insert into team_demand (organization_id, allocation_run_id, team_id, term_id,"
        " min_lines, max_lines)"
        " select $1, $2, tm.id, t.id, 0, 1"
        " from (select id, row_number() over (order by id) as k from teams"
        "       where organization_id = $1) tm"
        " cross join (select id, ordinal from terms where allocation_run_id = $2) t"
        " where not exists (select 1 from team_demand d where d.allocation_run_id = $2"
        "                    and d.team_id = tm.id and d.term_id = t.id)"
        " order by (tm.k + t.ordinal) % $3, tm.k limit $4",
        org.id, ar, want.terms, want.demand_rows - have.demand_rows)
    await _baseline_plan(conn, org.id, ar, org.suggested_n_job_lines)
    built = await problem_size(conn, ar, want.lines)
    if built != want:
        raise AssertionError(f"seeded {built}, wanted {want}")
    return dataclasses.replace(org, suggested_n_job_lines=want.lines, n_terms=built.terms,
                               n_teams=built.teams, n_demand_rows=built.demand_rows), built


async def s8_giant_problem(c: Campaign, r: Run, reps: int) -> None:
    """A tenant inserts the largest problem its limits admit (max_job_lines lines, max_teams
    teams, max_terms terms, max_demand_rows demand rows: seed_giant; GIANT_QUICK in the quick
    version): the listener's heartbeats, its own (planner_engine.listener_heartbeat) and the
    run's, keep their interval (at most 1.5 x the interval between two beats) while it loads,
    validates and hands the problem to the solver child, whatever becomes of the run (the
    child may die of its memory cap). A refused insert is a violation: the problem must be
    admitted."""
    full = reps > QUICK_REPS
    giant, size = await seed_giant(c.db, c.settings,
                                   None if full else lambda _: GiantSize(**GIANT_QUICK))
    slot = Slot(giant, giant.allocation_run_id)
    lst = r.listener("G")
    await lst.wait_ready()
    stop = asyncio.Event()
    listener_beats = asyncio.create_task(beats(
        c.dsn, "select beat_at from planner_private.listener_heartbeats where worker_id = $1",
        lst.worker_id, stop))
    run_gaps: list[float] = []
    outcomes: list[str] = []
    try:
        for _ in range(max(1, reps // 2)):
            try:
                rid = await r.insert({"time_limit_seconds": 2}, slot=slot)
            except asyncpg.PostgresError as exc:
                r.r.violations.append(f"the admitted maximum was refused: {exc.sqlstate} {exc}")
                break
            run_stop = asyncio.Event()
            run_beats = asyncio.create_task(beats(
                c.dsn, "select heartbeat_at from allocation_planner_runs where id = $1::uuid"
                   " and status = 'GENERATING'", rid, run_stop))
            row = await r.wait_status(rid, TERMINAL, timeout_s=180)
            run_stop.set()
            run_gaps.append(longest_gap(await run_beats))
            outcomes.append(f"{row['status']} ({(row['error'] or '')[:60]})")
    finally:
        stop.set()
        listener_gap = longest_gap(await listener_beats)
    bound = 1.5 * HEARTBEAT_S
    r.r.notes.append(
        f"{len(outcomes)} run(s) of {size} ({'the limits' if full else 'quick'}):"
        f" {outcomes}; longest gap between listener heartbeats {listener_gap:.2f} s, between"
        f" the run's heartbeats {max(run_gaps, default=0.0):.2f} s (interval {HEARTBEAT_S:.0f} s,"
        f" bound {bound:.1f} s)")
    if listener_gap > bound or max(run_gaps, default=0.0) > bound:
        r.r.violations.append(f"a heartbeat gap exceeded {bound:.1f} s")
    await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=SWEEP_PERIOD_S)


async def s9_tenant_flood(c: Campaign, r: Run, reps: int) -> None:
    """One organisation floods (a run on every one of its allocation runs at once); a moment
    later another inserts one run. The database's round robin claims the polite run within
    one flood run per listener, and a pending TTL (FLOOD_PENDING_TTL_S) shorter than the
    flood's last run waits does not fail a run while a listener is alive (it must exceed the
    listener's heartbeat interval, with room for a loaded machine). Fails on the oldest-first
    queue it replaced."""
    n_listeners = 1
    for n in range(n_listeners):
        await r.listener(f"F{n}").wait_ready()
    by_org: dict[str, list[Slot]] = {}
    for s in c.small:
        by_org.setdefault(s.org.id, []).append(s)
    orgs = list(by_org)
    stop = asyncio.Event()

    async def pending_sweeper() -> None:  # the campaign's loop uses the default pending TTL
        while not stop.is_set():
            with contextlib.suppress(Exception):
                await r._bounded("select planner_private.sweep_stale_runs($1::text::interval,"
                                 " $2::text::interval)", f"{SWEEP_TTL_S} seconds",
                                 f"{FLOOD_PENDING_TTL_S} seconds")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    sweeper = asyncio.create_task(pending_sweeper())
    worst = 0
    # The quick version (CI): one flood of three runs; the full one: reps floods of five.
    floods, size = (reps, ARS_PER_ORG) if reps > QUICK_REPS else (1, 3)
    try:
        for i in range(floods):
            flooder, polite = orgs[(2 * i) % len(orgs)], orgs[(2 * i + 1) % len(orgs)]
            flood = [await r.insert({"time_limit_seconds": 1}, slot=s)
                     for s in by_org[flooder][:size]]
            await r.wait_status(flood[0], {"GENERATING", *TERMINAL})
            mine = await r.insert({"time_limit_seconds": 1}, slot=by_org[polite][0])
            await r.wait_status(mine, {"GENERATING", *TERMINAL})
            ahead = await c.q().fetchval(
                "select count(*) from allocation_planner_runs f, allocation_planner_runs m"
                " where m.id = $1 and f.id = any($2::uuid[])"
                " and f.claimed_at > m.created_at and f.claimed_at < m.claimed_at",
                mine, flood)
            worst = max(worst, int(ahead))
            await r.settle(timeout_s=120)
    finally:
        stop.set()
        await sweeper
    r.r.notes.append(f"{floods} flood(s) of {size} runs; worst number of flood runs"
                     f" claimed ahead of the polite run: {worst} ({n_listeners} listener(s));"
                     f" pending TTL {FLOOD_PENDING_TTL_S:.0f} s")
    if worst > n_listeners:
        r.r.violations.append(f"{worst} flood runs claimed ahead of the polite run")
    await r.account(ttl_s=SWEEP_TTL_S, sweep_period_s=SWEEP_PERIOD_S, expect_all="COMPLETED")


SCENARIOS: dict[str, tuple[str, Scenario, bool]] = {
    # key: (title, function, campaign sweeper loop on)
    "s1": ("kill -9 mid-solve + restart (pg_cron sweeper)", s1_kill9, False),
    "s2": ("SIGTERM mid-solve, second listener", s2_sigterm, True),
    "s3": ("Realtime killed + restarted during inserts", s3_realtime, True),
    "s4": ("PostgreSQL fast restart mid-solve / mid-commit", s4_postgres, True),
    "s5": ("3 listeners, burst from 20 organisations", s5_burst, True),
    "s6": ("solver child: memory cap / SIGSEGV / SIGKILL", s6_solver_child, True),
    "s7": ("slow DB: commit longer than the TTL", s7_slow_db, False),
    "s8": ("giant problem: heartbeats keep their interval", s8_giant_problem, True),
    "s9": ("tenant flood: polite run within one run per listener", s9_tenant_flood, True),
}
#: Left out of the short campaign in `make test` (tests/chaos/test_campaign_quick.py), whose
#: wall time the whole suite shares: s8 costs ~25 s for a figure `bench/flood_bench.py`
#: measures on the real giant problem (docs/reliability.md). `--quick --only s8` still runs it.
QUICK_SKIP = frozenset({"s8"})


async def run_campaign(reps: int, only: list[str] | None = None, seed: int = 7,
                       out: Callable[[str], None] = print) -> list[Result]:
    chaos = ChaosStack(int(os.environ.get("PLANNER_CHAOS_PG_PORT", "54349")),
                       int(os.environ.get("PLANNER_CHAOS_REALTIME_PORT", "54350")))
    results: list[Result] = []
    try:
        c = Campaign(chaos, seed)
        t0 = time.monotonic()
        await c.setup()
        out(f"# stack {chaos.settings.state_dir} up and seeded ({len(c.slots)} allocation runs,"
            f" {N_ORGS} + 1 organisations) in {time.monotonic() - t0:.0f} s; seed {seed}")
        out(Result.HEADER)
        out(Result.RULE)
        for key in only or list(SCENARIOS):
            res = await c.run(key, reps)
            results.append(res)
            out(res.row())
        out("")
        for res in results:
            out(f"- {res.key}: " + "; ".join(res.notes + [f"VIOLATION: {v}"
                                                          for v in res.violations]))
        with contextlib.suppress(Exception):
            await c.db.close()
    finally:
        await asyncio.to_thread(chaos.down)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--reps", type=int, default=20, help="repetitions per scenario")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_REPS} repetitions per scenario")
    ap.add_argument("--only", default="", help="comma-separated scenario keys, e.g. s1,s7")
    ap.add_argument("--seed", type=int, default=int(uuid.uuid4().int % 10_000),
                    help="random timing seed (printed, so a run can be replayed)")
    args = ap.parse_args(argv)
    reps = QUICK_REPS if args.quick else args.reps
    logger.remove()  # the stack's own progress lines would break the table
    logger.add(sys.stderr, level="WARNING")
    only = [k.strip() for k in args.only.split(",") if k.strip()] or None
    t0 = time.monotonic()
    shown = " ".join(argv if argv is not None else sys.argv[1:])
    print(f"$ python -m tests.chaos.campaign {shown}", flush=True)
    results = asyncio.run(run_campaign(reps, only, args.seed,
                                       out=lambda s: print(s, flush=True)))
    print(f"\ntotal {time.monotonic() - t0:.0f} s", flush=True)
    return 0 if results and all(r.passed for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
