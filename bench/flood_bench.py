"""Flood benchmark (issue 13): one tenant floods, 19 polite tenants insert one run each.

    nice -n 19 .venv/bin/python bench/flood_bench.py [--window 20] [--giant-teams N]

On the developer's local stack (started if needed), in a fresh cloned database with its own
local Realtime server and real `planner listen` processes:

* flood, with 1 and then 3 listeners: 20 new organisations; one inserts runs as fast as its
  limits allow for `--window` seconds (on a pool of allocation runs, one active run each; a
  refused insert is counted by SQLSTATE and retried: PL013 allocation run already active,
  PL014 runs per hour, PL043 queued runs, PL042 solver-seconds), each of the 19 others
  inserts a single run at a random moment of the window. All runs are small (12 and 6
  lines) with a 1 s solver limit: the order of claims is what is measured. Printed: the
  worst number of flood runs (and of runs of all organisations) claimed after a polite run
  was inserted and before it was claimed (target: at most one per listener), refusals by
  SQLSTATE, and runs FAILED by the pending timeout, with the pending TTL set to 5 s and the
  sweeper called every second (target 0: a run waiting behind other organisations' runs is
  not failed while a listener is alive); the error texts of the runs that ended FAILED,
  grouped;
* heartbeat gap: one listener (heartbeat interval 1 s) while a tenant inserts the largest
  problem its limits admit (planner_private.limits_of: max_job_lines lines, max_teams teams,
  max_terms terms, max_demand_rows demand rows spread over every term; `--giant-teams`
  asks for fewer teams, never more): the longest gap between two of the listener's
  heartbeats and between two of the run's heartbeats (target <= 1.5 x the interval);
* hot rows: WAL bytes written by one run heartbeat on a run whose `options` holds ~1 MB,
  with the table's replica identity (default) and, for comparison, FULL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack import stack
from devstack.seed import SeededOrganization, seed_organization
from devstack.settings import DevSettings
from tests.chaos.campaign import (
    GiantSize,
    _clone_allocation_run,
    beats,
    longest_gap,
    seed_giant,
)
from tests.support.databases import cloned_database
from tests.support.harness import TERMINAL, ListenerProcess, insert_run, listener_env
from tests.support.realtime import RealtimeServer

TRIVIAL: dict[str, Any] = {"lines": 6, "terms": 2, "teams": 8, "rule_sets": []}
#: The flood's runs are small too: what matters is the order they are claimed in, and the
#: benchmark must finish in minutes on a shared 2-core machine.
FLOOD: dict[str, Any] = {"lines": 12, "terms": 3, "teams": 12, "rule_sets": []}
#: The flooder's allocation runs: more than its hourly limit (30 runs), so that its limits,
#: not its allocation runs, bind (queued_runs, 10 at once, binds first with the defaults).
FLOOD_ARS = 32
PENDING_TTL_S = 5
HEARTBEAT_S = 1.0


async def _insert(db: asyncpg.Connection, org: SeededOrganization, ar: str,
                  options: dict[str, Any]) -> str:
    return await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                            allocation_run_id=ar, n_job_lines=org.suggested_n_job_lines,
                            constraints=org.suggested_constraints, options=options)


def _grouped(errors: list[str], width: int = 90) -> dict[str, int]:
    """FAILED runs' error texts, truncated and with numbers and ids blanked, so that the same
    cause with different values counts as one."""
    out: dict[str, int] = {}
    for e in errors:
        key = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", e.splitlines()[0] if e else "(none)")
        key = re.sub(r"\d+(\.\d+)?", "N", key)
        key = key if len(key) <= width else key[: width - 3] + "..."
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _tally(counts: dict[str, int]) -> str:
    """`PL013: 779, PL014: 55`: refusals by SQLSTATE, most frequent first."""
    return ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) \
        or "none"


async def _sweeper(dsn: str, stop: asyncio.Event) -> None:
    """What pg_cron does every minute, every second (the operator's timeouts apply)."""
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            await conn.fetchval("select planner_engine.sweep_stale_runs()")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await conn.close()


async def flood(settings: DevSettings, name: str, rt_url: str, n_listeners: int,
                window_s: float, rnd: random.Random, tmp: Path) -> dict[str, Any]:
    dsn = settings.dsn(name)
    db = await asyncpg.connect(dsn)
    tag = f"L{n_listeners}"
    flooder = await seed_organization(db, settings, f"Flooder {tag}", instance_seed=99, **FLOOD)
    ars = [flooder.allocation_run_id] + [
        await _clone_allocation_run(db, flooder.id, flooder.allocation_run_id, k)
        for k in range(1, FLOOD_ARS)]
    polite = [await seed_organization(db, settings, f"Polite {tag} {i}", instance_seed=i,
                                      **TRIVIAL) for i in range(19)]
    # every run asks for 1 s; the cap is the database's (max_time_limit_s), not the listener's
    env = listener_env(settings, name, rt_url, PLANNER_HEARTBEAT_INTERVAL_S=HEARTBEAT_S)
    procs = [ListenerProcess(env, tmp / f"{tag}-{i}.log", worker_id=f"{tag}-{i}").start()
             for i in range(n_listeners)]
    refused: dict[str, int] = {}  # SQLSTATE -> refused inserts
    examples: dict[str, str] = {}  # SQLSTATE -> the first refusal's message
    flood_ids: list[str] = []
    polite_ids: list[str] = []
    stop = asyncio.Event()
    sweeper = asyncio.create_task(_sweeper(dsn, stop))
    try:
        for p in procs:
            await p.wait_ready()
        t0 = time.monotonic()

        async def flood_loop() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                while time.monotonic() - t0 < window_s:
                    progressed = False
                    for ar in ars:
                        try:
                            flood_ids.append(await _insert(
                                conn, flooder, ar, {"time_limit_seconds": 1}))
                            progressed = True
                        except asyncpg.PostgresError as exc:
                            # PL013 (this allocation run is busy) included: one active run
                            # per allocation run is a limit too; the loop tries the next.
                            code = str(exc.sqlstate)
                            refused[code] = refused.get(code, 0) + 1
                            examples.setdefault(code, str(exc).splitlines()[0])
                    if not progressed:
                        await asyncio.sleep(0.2)  # every allocation run busy or refused
            finally:
                await conn.close()

        async def one_polite(org: SeededOrganization) -> None:
            await asyncio.sleep(rnd.uniform(0, window_s))
            conn = await asyncpg.connect(dsn)
            try:
                polite_ids.append(await _insert(conn, org, org.allocation_run_id,
                                                {"time_limit_seconds": 1}))
            finally:
                await conn.close()

        await asyncio.gather(flood_loop(), *(one_polite(o) for o in polite))
        deadline = time.monotonic() + 900
        ids = flood_ids + polite_ids
        while time.monotonic() < deadline:
            left = await db.fetchval(
                "select count(*) from allocation_planner_runs where id = any($1::uuid[])"
                " and status not in ('COMPLETED', 'INFEASIBLE', 'FAILED', 'CANCELLED')", ids)
            if left == 0:
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await sweeper
        for p in procs:
            p.stop_now()
    ahead = await db.fetch(
        "select m.id,"
        " count(*) filter (where f.organization_id = $3) as flood_ahead,"
        " count(f.id) as all_ahead"
        " from allocation_planner_runs m left join allocation_planner_runs f"
        " on f.claimed_at > m.created_at and f.claimed_at < m.claimed_at"
        " and f.id <> m.id and f.id = any($2::uuid[])"
        " where m.id = any($1::uuid[]) group by m.id",
        polite_ids, flood_ids + polite_ids, flooder.id)
    statuses = {r["status"]: r["n"] for r in await db.fetch(
        "select status, count(*) as n from allocation_planner_runs where id = any($1::uuid[])"
        " group by 1", flood_ids + polite_ids)}
    failed = await db.fetch(
        "select error from allocation_planner_runs where id = any($1::uuid[])"
        " and status = 'FAILED'", flood_ids + polite_ids)
    pending_failed = await db.fetchval(
        "select count(*) from allocation_planner_runs where id = any($1::uuid[])"
        " and status = 'FAILED' and error like 'no planner picked this run up%'",
        flood_ids + polite_ids)
    waits = [(r["claimed_at"] - r["created_at"]).total_seconds() for r in await db.fetch(
        "select created_at, claimed_at from allocation_planner_runs"
        " where id = any($1::uuid[]) and claimed_at is not null", polite_ids)]
    await db.close()
    return {
        "listeners": n_listeners, "flood_runs": len(flood_ids), "polite_runs": len(polite_ids),
        "worst_flood_ahead": max((r["flood_ahead"] for r in ahead), default=0),
        "worst_all_ahead": max((r["all_ahead"] for r in ahead), default=0),
        "worst_polite_wait_s": max(waits, default=0.0),
        "refused": refused, "examples": examples, "statuses": statuses,
        "pending_failed": pending_failed, "failed": _grouped([r["error"] or "" for r in failed]),
    }


async def heartbeat_gap(settings: DevSettings, name: str, rt_url: str, teams: int | None,
                        tmp: Path) -> dict[str, Any]:
    """The largest problem the limits admit (fewer teams when `teams` says so; ValueError
    above the limit), inserted while one listener runs."""
    dsn = settings.dsn(name)
    db = await asyncpg.connect(dsn)

    def fewer_teams(limit: GiantSize) -> GiantSize:
        assert teams is not None
        return dataclasses.replace(limit, teams=teams,
                                   demand_rows=min(limit.demand_rows, teams * limit.terms))

    giant, size = await seed_giant(db, settings, None if teams is None else fewer_teams)
    env = listener_env(settings, name, rt_url, PLANNER_HEARTBEAT_INTERVAL_S=HEARTBEAT_S)
    proc = ListenerProcess(env, tmp / "giant.log", worker_id="giant").start()
    stop = asyncio.Event()
    try:
        await proc.wait_ready()
        listener_beats = asyncio.create_task(beats(
            dsn, "select beat_at from planner_private.listener_heartbeats where worker_id = $1",
            "giant", stop))
        await asyncio.sleep(3 * HEARTBEAT_S)  # a few beats before the insert
        t0 = time.monotonic()
        try:
            rid = await _insert(db, giant, giant.allocation_run_id, {"time_limit_seconds": 2})
        except asyncpg.PostgresError as exc:  # the point is that it is admitted
            raise AssertionError(f"the largest problem admitted ({size}) was refused:"
                                 f" {exc.sqlstate} {exc}") from exc
        run_beats = asyncio.create_task(beats(
            dsn, "select heartbeat_at from allocation_planner_runs where id = $1::uuid"
                 " and status = 'GENERATING'", rid, stop))
        while True:
            row = await db.fetchrow("select status, error from allocation_planner_runs"
                                    " where id = $1", rid)
            if row["status"] in TERMINAL:
                break
            await asyncio.sleep(0.2)
        took = time.monotonic() - t0
        await asyncio.sleep(2 * HEARTBEAT_S)
    finally:
        stop.set()
        proc.stop_now()
    result = {
        "size": size, "limits": teams is None, "status": row["status"],
        "error": (row["error"] or "")[:80], "seconds": took,
        "listener_gap_s": longest_gap(await listener_beats),
        "run_gap_s": longest_gap(await run_beats),
    }
    await db.close()
    return result


async def wal_per_heartbeat(settings: DevSettings, name: str) -> dict[str, float]:
    db = await asyncpg.connect(settings.dsn(name))
    org = await seed_organization(db, settings, "WAL", instance_seed=5, **TRIVIAL)
    blob = await db.fetchval("select string_agg(md5(random()::text) || md5(random()::text), '')"
                             " from generate_series(1, 16384)")
    # an operator's override lets this organisation send such options (planner limits set;
    # the default max_options_bytes refuses them): the figure is what a big row would cost
    await db.execute("insert into planner_engine.limits (organization_id, max_options_bytes)"
                     " values ($1, $2)", org.id, 2 * len(blob))
    run = await db.fetchval(
        "insert into allocation_planner_runs (organization_id, allocation_run_id, n_job_lines,"
        " options) values ($1, $2, 2, $3::jsonb) returning id", org.id, org.allocation_run_id,
        json.dumps({"note": blob}))
    lease = await db.fetchval("select lease from planner_engine.claim_run('wal', $1)", run)

    async def measure() -> float:
        best = None
        for _ in range(10):
            a = await db.fetchval("select pg_current_wal_insert_lsn()")
            await db.execute("select planner_engine.heartbeat($1, $2)", run, lease)
            b = await db.fetchval("select pg_current_wal_insert_lsn()")
            used = float(await db.fetchval("select pg_wal_lsn_diff($1, $2)", b, a))
            best = used if best is None else min(best, used)
        assert best is not None
        return best

    default = await measure()
    a = await db.fetchval("select pg_current_wal_insert_lsn()")
    await db.execute("select planner_engine.listener_heartbeat('wal')")
    b = await db.fetchval("select pg_current_wal_insert_lsn()")
    listener = float(await db.fetchval("select pg_wal_lsn_diff($1, $2)", b, a))
    tx = db.transaction()
    await tx.start()
    await db.execute("alter table allocation_planner_runs replica identity full")
    full = await measure()
    await tx.rollback()
    await db.execute("update allocation_planner_runs set status = 'FAILED', lease = null,"
                     " finished_at = now() where id = $1", run)
    await db.close()
    return {"options_bytes": float(len(blob)), "default": default, "full": full,
            "listener": listener}


async def main(window_s: float, giant_teams: int | None, seed: int) -> None:
    settings: DevSettings = await asyncio.to_thread(stack.up)
    rnd = random.Random(seed)
    async with cloned_database(settings, prefix="flood") as name:
        db = await asyncpg.connect(settings.dsn(name))
        await db.execute("update planner_engine.settings set pending_run_ttl = $1::text::interval",
                         f"{PENDING_TTL_S} seconds")
        # Refuse --giant-teams above the limit before the flood, not minutes later (the
        # giant organisation is new: the default row applies; seed_giant checks again).
        max_teams = await db.fetchval(
            "select max_teams from planner_engine.limits where tier = 'default'")
        if giant_teams is not None and not 1 <= giant_teams <= max_teams:
            raise ValueError(f"--giant-teams {giant_teams}: the limits admit 1 to {max_teams}"
                             " teams (max_teams)")
        await db.close()
        with RealtimeServer(settings, name) as rt, tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            floods = [await flood(settings, name, rt.url, n, window_s, rnd, tmp) for n in (1, 3)]
            gap = await heartbeat_gap(settings, name, rt.url, giant_teams, tmp)
        wal = await wal_per_heartbeat(settings, name)

    print(f"flood benchmark: window {window_s:.0f} s, 1 flooding + 19 polite organisations,"
          f" pending TTL {PENDING_TTL_S} s (sweeper every 1 s), seed {seed}")
    print(f"{'figure':<62} {'1 listener':>12} {'3 listeners':>12} {'target':>10}")

    def line(label: str, key: str, target: str) -> None:
        print(f"{label:<62} {floods[0][key]!s:>12} {floods[1][key]!s:>12} {target:>10}")

    line("runs inserted by the flooding organisation", "flood_runs", "")
    line("polite runs (one per organisation)", "polite_runs", "19")
    line("worst flood runs claimed ahead of a polite run", "worst_flood_ahead", "<= 1/lst.")
    line("worst runs of any organisation claimed ahead of a polite run", "worst_all_ahead", "")
    print(f"{'longest wait of a polite run, insert to claim (s)':<62}"
          f" {floods[0]['worst_polite_wait_s']:>12.1f} {floods[1]['worst_polite_wait_s']:>12.1f}")
    line("runs FAILED by the pending timeout", "pending_failed", "0")
    for f in floods:
        print(f"  {f['listeners']} listener(s): outcomes {f['statuses']}; refused inserts"
              f" {_tally(f['refused'])}")
        for text, n in f["failed"].items():
            print(f"    FAILED x{n}: {text}")
    codes = {k: v for f in floods for k, v in f["examples"].items()}
    for code in sorted(codes):
        print(f"  {code} = {codes[code][:90]}")
    what = "the largest problem the limits admit" if gap["limits"] else "a smaller problem"
    print(f"heartbeat gap, {what} ({gap['size']}; run {gap['status']} in"
          f" {gap['seconds']:.1f} s {gap['error']!r}):")
    print(f"  longest gap between listener heartbeats {gap['listener_gap_s']:.2f} s, between the"
          f" run's heartbeats {gap['run_gap_s']:.2f} s (interval {HEARTBEAT_S:.0f} s, target"
          f" <= {1.5 * HEARTBEAT_S:.1f} s)")
    print(f"hot rows: WAL per run heartbeat with a {wal['options_bytes'] / 1e6:.1f} MB options:"
          f" {wal['default']:.0f} bytes (default replica identity), {wal['full']:.0f} bytes"
          f" (REPLICA IDENTITY FULL); per listener heartbeat {wal['listener']:.0f} bytes")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--window", type=float, default=20.0, help="seconds the flood lasts")
    ap.add_argument("--giant-teams", type=int, default=None,
                    help="teams of the giant problem (default: the limit, max_teams; never more)")
    ap.add_argument("--seed", type=int, default=13)
    args = ap.parse_args()
    try:
        asyncio.run(main(args.window, args.giant_teams, args.seed))
    except ValueError as exc:  # --giant-teams above the limit
        sys.exit(f"flood_bench: {exc}; pass a smaller --giant-teams, or none for the limit")
