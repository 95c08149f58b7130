"""`planner demo` (`make demo`): the whole product on the local stack, as a manager sees it.

1. bring the local stack up and seed (once) a realistic organisation: 125 interns, 5 terms,
   50 teams, VIC_PGY1;
2. start a real listener (`planner listen`) in the background;
3. act as the manager's UI: sign a JWT for a planner of that organisation, insert a run the way
   PostgREST would (role `authenticated`, claims set, so RLS and the insert trigger apply), and
   watch the private channel `planner_run:<id>` with the official Realtime client, drawing a
   progress bar from the listener's broadcasts;
4. print a readable summary of the plan and where it lives;
5. on every later run: show that the previous plan was snapshotted into `job_lines_history`,
   then restore it (and say how to undo the restore).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from realtime.types import BroadcastPayload
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from devstack import keys, stack
from devstack.seed import SeededOrganization, seed_organization
from devstack.settings import DevSettings
from listener.roles import acting_as

console = Console()
DEMO_ORG = "Demo Health"
TIME_LIMIT_S = 15


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _demo_org(conn: asyncpg.Connection, settings: DevSettings) -> dict[str, str]:
    """The demo organisation, seeded on the first run and found again on later ones."""
    state = settings.state_dir / "demo.json"
    if state.exists():
        saved = json.loads(state.read_text())
        if await conn.fetchval("select true from organizations where id = $1", saved["org_id"]):
            return dict(saved)
    console.print("[bold]Seeding[/] a demo organisation (125 lines, 5 terms, 50 teams, VIC_PGY1)")
    org: SeededOrganization = await seed_organization(conn, settings, DEMO_ORG, instance_seed=7)
    saved = {"org_id": org.id, "org_name": org.name, "allocation_run_id": org.allocation_run_id,
             "planner_id": org.planner.id, "planner_email": org.planner.email}
    state.write_text(json.dumps(saved, indent=2))
    return saved


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class _Listener:
    """A real `planner listen` for the demo's lifetime, logging to a file."""

    def __init__(self, settings: DevSettings) -> None:
        self.log = settings.log_dir / "demo-listener.log"
        self.port = _free_port()
        env = {**os.environ, **stack.env(settings), "PLANNER_LOG_FORMAT": "json",
               "PLANNER_WORKER_ID": "demo-listener", "PLANNER_HEALTH_HOST": "127.0.0.1",
               "PLANNER_HEALTH_PORT": str(self.port)}
        # `dev env` gives both key kinds; the listener prefers SUPABASE_SECRET_KEY, so the demo
        # runs on the new sb_secret_ key (the local Realtime server accepts it as hosted does).
        planner = str(Path(sys.executable).with_name("planner"))
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([planner, "listen"], env=env, stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def ready(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}/readyz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the listener exited; see {self.log}")
            if await asyncio.to_thread(_ok, url):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the listener did not become ready; see {self.log}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


async def _watch(
    settings: DevSettings, run_id: str, token: str, db: asyncpg.Connection
) -> dict[str, Any]:
    """Follow the run on its private channel with a progress bar until it is finished."""
    anon = keys.api_key("anon", settings.jwt_secret)
    client = AsyncRealtimeClient(f"{settings.supabase_url}/realtime/v1", anon)
    await client.set_auth(token)
    done = asyncio.Event()
    final: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("waiting", total=1000, info="")

        def on_status(msg: BroadcastPayload) -> None:
            p: dict[str, Any] = msg.get("payload", {})
            phase = p.get("phase", "")
            where = f" (position {p['position']})" if p.get("position") else ""
            bar.update(task, description=f"{phase}{where}")

        def on_progress(msg: BroadcastPayload) -> None:
            p: dict[str, Any] = msg.get("payload", {})
            frac = p.get("elapsed_ms", 0) / max(1, p.get("time_limit_ms", 1))
            gap = p.get("gap")
            info = (f"{p.get('solutions', 0)} solutions, objective {p.get('objective')}"
                    + (f", gap {gap:.1%}" if isinstance(gap, int | float) else ""))
            bar.update(task, completed=min(1000, int(frac * 1000)), info=info)

        def on_done(msg: BroadcastPayload) -> None:
            final.update(msg.get("payload", {}))
            bar.update(task, completed=1000, description=str(final.get("status", "done")))
            done.set()

        channel = client.channel(f"planner_run:{run_id}", {"config": {
            "private": True, "broadcast": {"self": False, "ack": False},
            "presence": {"key": "", "enabled": False}}})
        channel.on_broadcast("status", on_status).on_broadcast("progress", on_progress)
        channel.on_broadcast("done", on_done)
        subscribed = asyncio.Event()

        def on_sub(state: RealtimeSubscribeStates, _: Exception | None) -> None:
            if state == RealtimeSubscribeStates.SUBSCRIBED:
                subscribed.set()

        await channel.subscribe(on_sub)
        # The row is the truth: broadcasts are best effort, so poll it as well.
        while not done.is_set():
            status = await db.fetchval(
                "select status from allocation_planner_runs where id = $1", run_id)
            if status in ("COMPLETED", "INFEASIBLE", "FAILED", "CANCELLED"):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), timeout=2)
                bar.update(task, completed=1000, description=status)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=0.5)
    await client.close()
    return final


async def _summary(db: asyncpg.Connection, run_id: str, info: dict[str, str]) -> None:
    run = await db.fetchrow("select * from allocation_planner_runs where id = $1", run_id)
    assert run is not None
    meta = run["result_metadata"] or {}
    if isinstance(meta, str):
        meta = json.loads(meta)
    console.rule(f"[bold]Run {run_id}: {run['status']}")
    if run["status"] != "COMPLETED":
        console.print(f"error: {run['error']}")
        for line in meta.get("explanation") or []:
            console.print(f"  • {line}")
        return
    unfilled = sum(u["missing"] for u in meta.get("unfilled") or [])
    console.print(
        f"{run['n_job_lines']} job lines under {', '.join(run['constraints'])}: solver "
        f"{meta.get('solver_status')} in {meta.get('solve_seconds', 0):.1f}s, objective "
        f"{meta.get('objective')}, gap {meta.get('gap')}, {unfilled} unfilled position(s), "
        f"{meta.get('changed_cells', 0)} cell(s) changed vs the previous plan")
    terms = await db.fetch("select id, name from terms where allocation_run_id = $1 "
                           "order by ordinal", info["allocation_run_id"])
    rows = await db.fetch(
        "select jl.line_number, r.term_id, t.name as team, t.kind, r.pinned"
        " from job_lines jl join rotations r on r.job_line_id = jl.id"
        " join teams t on t.id = r.team_id where jl.allocation_run_id = $1 and jl.line_number <= 6"
        " order by jl.line_number", info["allocation_run_id"])
    table = Table("line", *[t["name"] for t in terms], title="The first job lines")
    by_line: dict[int, dict[Any, str]] = {}
    for r in rows:
        by_line.setdefault(r["line_number"], {})[r["term_id"]] = r["team"] + (
            " 📌" if r["pinned"] else "")
    for n, cells in sorted(by_line.items()):
        table.add_row(str(n), *[cells.get(t["id"], "") for t in terms])
    console.print(table)
    kinds = Counter(
        r["kind"] for r in await db.fetch(
            "select t.kind from job_lines jl join rotations r on r.job_line_id = jl.id"
            " join teams t on t.id = r.team_id where jl.allocation_run_id = $1",
            info["allocation_run_id"]))
    console.print(f"rotations by kind of team: {dict(kinds)}")
    planner = stack.planner_command()
    console.print(
        "\n[bold]Where it lives[/]\n"
        f"  public.job_lines / public.rotations where allocation_run_id = "
        f"'{info['allocation_run_id']}'\n"
        "[bold]Look at it[/] (these commands work as printed, from this folder)\n"
        f"  eval \"$({planner} dev env)\"\n"
        f"  {planner} runs show {run_id}\n"
        f"  {planner} runs logs {run_id}\n"
        f"  {planner} history list --allocation-run {info['allocation_run_id']}",
        soft_wrap=True, highlight=False)


async def _restore_previous(db: asyncpg.Connection, run_id: str, info: dict[str, str]) -> None:
    snap = await db.fetchrow(
        "select id, n_lines, taken_at from job_lines_history where planner_run_id = $1", run_id)
    if snap is None:
        console.print("\nFirst plan for this allocation run: nothing was replaced. Run "
                      "[bold]make demo[/] again to see the snapshot and restore.")
        return
    console.rule("[bold]The previous plan")
    console.print(f"Before writing, the listener snapshotted the previous plan "
                  f"({snap['n_lines']} lines) as job_lines_history {snap['id']}.")
    async with acting_as(db, "authenticated", sub=info["planner_id"]) as c:
        undo = await c.fetchval("select public.restore_job_lines($1)", snap["id"])
    console.print(f"Restored it as the planner {info['planner_email']} "
                  f"(restore_job_lines). The plan it replaced is snapshot {undo}; "
                  f"`{stack.planner_command()} history restore {undo}` (after the `eval` "
                  "above) undoes the restore.", soft_wrap=True, highlight=False)


async def run_demo(settings: DevSettings, time_limit_s: float = TIME_LIMIT_S) -> int:
    s = settings
    db = await asyncpg.connect(s.dsn())
    listener: _Listener | None = None
    try:
        info = await _demo_org(db, s)
        console.print(f"Organisation [bold]{info['org_name']}[/], planner {info['planner_email']}")
        listener = _Listener(s)
        await listener.ready()
        console.print(f"Listener running (logs: {listener.log})")
        token = keys.user_token(info["planner_id"], s.jwt_secret, email=info["planner_email"])
        async with acting_as(db, "authenticated", sub=info["planner_id"]) as c:
            run_id = str(await c.fetchval(
                "insert into allocation_planner_runs (organization_id, allocation_run_id,"
                " n_job_lines, constraints, options) values ($1, $2, 125, '{VIC_PGY1}', $3::jsonb)"
                " returning id", info["org_id"], info["allocation_run_id"],
                json.dumps({"time_limit_seconds": time_limit_s})))
        console.print(f"Inserted run {run_id} as the planner (RLS and the insert checks apply)")
        await _watch(s, run_id, token, db)
        await _summary(db, run_id, info)
        await _restore_previous(db, run_id, info)
        status = await db.fetchval("select status from allocation_planner_runs where id = $1",
                                   run_id)
        return 0 if status == "COMPLETED" else 1
    finally:
        if listener is not None:
            code = listener.stop()
            console.print(f"Listener stopped (exit {code}).")
        await db.close()
