"""Listener benchmark: prints a table of the figures the listener issue targets.

    .venv/bin/python bench/listener_bench.py [--runs 100] [--burst 20]

On the developer's local stack (started if needed), in a fresh cloned database with its own
local Realtime server and one real `planner listen`:

* insert-to-claim latency through Realtime: the catch-up scan is set to an hour, so every claim
  is woken by a postgres_changes event; runs are inserted one at a time as a planner user and
  latency is `claimed_at - created_at` (both PostgreSQL timestamps);
* per-run overhead outside the solve: claim + load_problem + commit_plan, from the listener's
  own "run finished" log records, for trivial runs and for a 250-line plan;
* trivial runs per second: a burst of runs from as many organisations, inserted at once,
  first insert to last COMPLETED (each run pays a fresh solver child process);
* idle memory (VmRSS) of the listener after it has subscribed and settled.

Targets (docs/benchmarks.md): p50 <= 50 ms, p99 <= 250 ms, overhead <= 100 ms, idle RSS <= 150 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
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
from tests.support.databases import GENEROUS_DEFAULT_LIMITS_SQL, cloned_database
from tests.support.harness import (
    TERMINAL,
    ListenerProcess,
    insert_run,
    listener_env,
    wait_all,
    wait_for_status,
)
from tests.support.realtime import RealtimeServer

TRIVIAL = {"lines": 6, "terms": 2, "teams": 8, "rule_sets": []}
BIG = {"lines": 250, "terms": 5, "teams": 80, "rule_sets": ["VIC_PGY1"]}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_one(db: asyncpg.Connection, org: SeededOrganization, options: dict[str, Any]) -> str:
    return await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                            allocation_run_id=org.allocation_run_id,
                            n_job_lines=org.suggested_n_job_lines,
                            constraints=org.suggested_constraints, options=options)


async def main(runs: int, burst: int) -> None:
    settings: DevSettings = await asyncio.to_thread(stack.up)
    async with cloned_database(settings, prefix="bench") as name:
        db = await asyncpg.connect(settings.dsn(name))
        orgs = [await seed_organization(db, settings, f"Bench {i}", instance_seed=i, **TRIVIAL)
                for i in range(max(burst, 1))]
        big = await seed_organization(db, settings, "Bench big", instance_seed=99, **BIG)
        await db.execute(GENEROUS_DEFAULT_LIMITS_SQL, 100000)
        with RealtimeServer(settings, name) as rt, tempfile.TemporaryDirectory() as tmp:
            env = listener_env(settings, name, rt.url, PLANNER_RECONCILE_INTERVAL_S=3600,
                               PLANNER_HEARTBEAT_INTERVAL_S=10)
            proc = ListenerProcess(env, Path(tmp) / "listener.log", worker_id="bench").start()
            try:
                await proc.wait_ready()
                await asyncio.sleep(5)
                assert proc.proc is not None
                idle_rss = rss_mb(proc.proc.pid)

                trivial = {"time_limit_seconds": 5}
                latencies = []
                for i in range(runs):
                    run_id = await run_one(db, orgs[i % len(orgs)], trivial)
                    row = await wait_for_status(db, run_id, TERMINAL, 60)
                    assert row["status"] == "COMPLETED", row
                    latencies.append((row["claimed_at"] - row["created_at"]).total_seconds())

                t0 = time.perf_counter()
                ids = [await run_one(db, org, trivial) for org in orgs[:burst]]
                rows = await wait_all(db, ids, 600)
                burst_s = time.perf_counter() - t0
                assert all(r["status"] == "COMPLETED" for r in rows)

                big_ids = []
                for _ in range(3):
                    rid = await run_one(db, big, {"time_limit_seconds": 2})
                    assert (await wait_for_status(db, rid, TERMINAL, 120))["status"] == "COMPLETED"
                    big_ids.append(rid)
                await asyncio.sleep(1)
                finished = {r["planner_run_id"]: r for r in proc.records()
                            if str(r.get("message", "")).startswith("run finished")}
            except BaseException:
                print(proc.log(20000), file=sys.stderr)
                raise
            finally:
                proc.stop_now()
        await db.close()

    def timing(ids: list[str], key: str) -> list[float]:
        return [float(finished[i][key]) for i in ids if i in finished and key in finished[i]]

    trivial_ids = [i for i in finished if i not in big_ids]
    over = timing(trivial_ids, "overhead_ms")
    big_over = timing(big_ids, "overhead_ms")
    big_commit = timing(big_ids, "commit_ms")
    spawn = [float(finished[i]["solve_wall_ms"]) - float(finished[i]["solver_ms"])
             for i in trivial_ids if "solver_ms" in finished[i]]
    lat_ms = [x * 1000 for x in latencies]
    print(f"listener benchmark: {runs} sequential trivial runs, burst of {burst}, "
          f"3 x 250-line plans")
    print(f"{'figure':<52} {'value':>12} {'target':>10}")
    rows_out = [
        ("insert-to-claim latency p50 (ms)", statistics.median(lat_ms), "<= 50"),
        ("insert-to-claim latency p99 (ms)", pct(lat_ms, 99), "<= 250"),
        ("insert-to-claim latency max (ms)", max(lat_ms), ""),
        ("overhead claim+load+commit, trivial, p50 (ms)", statistics.median(over), "<= 100"),
        ("overhead claim+load+commit, trivial, p99 (ms)", pct(over, 99), "<= 100"),
        ("overhead claim+load+commit, 250-line plan, max (ms)", max(big_over), "<= 100"),
        ("  of which commit_plan of 250 lines, max (ms)", max(big_commit), ""),
        ("solver child start + teardown, trivial, p50 (ms)", statistics.median(spawn), ""),
        ("trivial runs per second (burst, one listener)", burst / burst_s, ""),
        ("idle RSS of the listener (MB)", idle_rss, "<= 150"),
    ]
    for label, value, target in rows_out:
        print(f"{label:<52} {value:>12.1f} {target:>10}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100, help="sequential runs for the latency")
    ap.add_argument("--burst", type=int, default=20, help="runs inserted at once")
    args = ap.parse_args()
    asyncio.run(main(args.runs, args.burst))
