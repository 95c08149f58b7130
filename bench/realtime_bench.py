"""Benchmark of the local Realtime server: insert-to-client latency and idle CPU.

    .venv/bin/python bench/realtime_bench.py [--inserts 300] [--idle-seconds 5]

Starts PostgreSQL if needed (`planner dev up` code path), clones a scratch database, runs
`python -m devstack.realtime` on a free port for it, subscribes the real Python `realtime`
client to INSERTs on a table in `supabase_realtime`, and inserts rows one by one. Latency is
measured from just before the INSERT is sent (autocommit, so commit included) to the
client's callback. Two subscriber kinds are measured: `service_role` (no RLS check) and an
`authenticated` user (one RLS visibility query per change). Idle CPU is the server process's
user+system time over a quiet period with a client connected.

Targets (issue 4): p50 <= 20 ms, p99 <= 100 ms; idle CPU near zero.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from realtime import AsyncRealtimeClient

from devstack import keys, stack
from devstack.settings import DevSettings
from tests.support.databases import cloned_database
from tests.support.realtime import RealtimeServer

SCHEMA = """
create table public.bench_members (user_id uuid primary key);
create table public.bench_items (id bigserial primary key, seq int not null, owner uuid,
                                 body text);
alter table public.bench_items enable row level security;
create policy bench_read on public.bench_items for select to authenticated
  using (exists (select 1 from public.bench_members m where m.user_id = auth.uid()));
alter publication supabase_realtime add table public.bench_items;
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


async def measure(url: str, token: str, dsn: str, inserts: int, label: str) -> list[float]:
    client = AsyncRealtimeClient(f"{url}/realtime/v1", token)
    received: dict[int, float] = {}
    done = asyncio.Event()
    ready = asyncio.Event()

    def on_insert(payload: dict[str, object]) -> None:
        data = payload["data"]
        assert isinstance(data, dict)
        received[int(data["record"]["seq"])] = time.perf_counter()
        if len(received) >= inserts:
            done.set()

    ch = client.channel(f"bench-{label}", {"config": {
        "broadcast": {"self": False, "ack": False}, "presence": {"key": "", "enabled": False},
        "private": False}})
    ch.on_postgres_changes("INSERT", on_insert, table="bench_items")
    ch.on_system(lambda _p: ready.set())
    await ch.subscribe()
    await asyncio.wait_for(ready.wait(), 10)
    conn = await asyncpg.connect(dsn)
    owner = uuid.uuid4()
    sent: dict[int, float] = {}
    try:
        for seq in range(inserts):
            sent[seq] = time.perf_counter()
            await conn.execute(
                "insert into bench_items (seq, owner, body) values ($1, $2, 'x')", seq, owner)
            await asyncio.sleep(0.005)  # a realistic trickle, not a bulk load
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await conn.close()
        await client.close()
    return [(received[s] - sent[s]) * 1000 for s in range(inserts) if s in received]


async def main(args: argparse.Namespace, settings: DevSettings) -> int:
    async with cloned_database(settings, prefix="rtbench") as db:
        dsn = settings.dsn(db)
        user = uuid.uuid4()
        conn = await asyncpg.connect(dsn)
        await conn.execute(SCHEMA)
        await conn.execute("insert into bench_members values ($1)", user)
        await conn.close()
        server = RealtimeServer(settings, db)
        await asyncio.to_thread(server.start)
        try:
            assert server.proc is not None
            rows = []
            for label, token in (
                ("service_role", keys.api_key("service_role", settings.jwt_secret)),
                ("authenticated", keys.user_token(str(user), settings.jwt_secret)),
            ):
                lat = await measure(server.url, token, dsn, args.inserts, label)
                rows.append((label, len(lat), statistics.median(lat), percentile(lat, 99),
                             max(lat)))
            # Idle CPU with one client connected and subscribed.
            idle_client = AsyncRealtimeClient(
                f"{server.url}/realtime/v1", keys.api_key("anon", settings.jwt_secret))
            ch = idle_client.channel("idle")
            ch.on_postgres_changes("*", lambda _p: None, table="bench_items")
            await ch.subscribe()
            await asyncio.sleep(1)
            c0, t0 = cpu_seconds(server.proc.pid), time.monotonic()
            await asyncio.sleep(args.idle_seconds)
            c1, t1 = cpu_seconds(server.proc.pid), time.monotonic()
            await idle_client.close()
            idle_pct = (c1 - c0) / (t1 - t0) * 100
        finally:
            await asyncio.to_thread(server.stop)

    print(f"local Realtime benchmark: {args.inserts} inserts per subscriber kind, "
          f"{os.cpu_count()} CPUs")
    print(f"{'subscriber':<15}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    ok = True
    for label, n, p50, p99, mx in rows:
        print(f"{label:<15}{n:>6}{p50:>10.2f}{p99:>10.2f}{mx:>10.2f}")
        ok = ok and n == args.inserts and p50 <= 20 and p99 <= 100
    print(f"idle CPU over {args.idle_seconds:.0f}s with a subscribed client: {idle_pct:.2f}%")
    ok = ok and idle_pct < 2.0
    print("targets (p50 <= 20 ms, p99 <= 100 ms, idle CPU < 2%):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inserts", type=int, default=300)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    sys.exit(asyncio.run(main(parser.parse_args(), stack.up())))
