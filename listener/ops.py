"""Operator commands: `planner runs ...` and `planner history ...`.

They connect with `--database-url` or `DATABASE_URL` (an operator's connection; there is no
default, so a production command never lands on a local database by accident) and act through
the same functions the UI uses, as `service_role`, so an operator's cancel or restore goes
through exactly the checks and logging a manager's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import typer
from rich.console import Console
from rich.table import Table

from listener.errors import CONNECT_ERRORS, describe_connect_error, describe_url_problem
from listener.roles import acting_as

runs_app = typer.Typer(help="Inspect and cancel planner runs.", no_args_is_help=True)
history_app = typer.Typer(help="List and restore job line snapshots.", no_args_is_help=True)
console = Console()
T = TypeVar("T")

#: How an operator's database is given, for error lines.
DATABASE_URL_SOURCE = "DATABASE_URL (or --database-url)"

DbOption = typer.Option(
    None, "--database-url", envvar="DATABASE_URL",
    help="Operator connection (required: --database-url or $DATABASE_URL).",
)


def planner_command() -> str:
    """How to type this `planner` from the current folder: `.venv/bin/planner` from the
    checkout (hints must work as printed, without an activated virtualenv)."""
    exe = Path(sys.executable).with_name("planner")
    with contextlib.suppress(ValueError):
        return str(exe.relative_to(Path.cwd()))
    return str(exe)


def require_database_url(database_url: str | None) -> str:
    """The database a production command works on: given explicitly, never guessed.

    Missing, it stops with one line naming both fixes (exit 2, a usage error).
    """
    if database_url:
        problem = describe_url_problem(database_url)
        if problem:
            typer.secho(f"error: the database URL from {DATABASE_URL_SOURCE} {problem}",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(2)
        return database_url
    typer.secho(
        "error: no database given: set DATABASE_URL or pass --database-url "
        f'(local stack: eval "$({planner_command()} dev env)")',
        fg=typer.colors.RED, err=True,
    )
    raise typer.Exit(2)


def _run(database_url: str | None, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    dsn = require_database_url(database_url)

    async def go() -> T:
        try:
            conn = await asyncpg.connect(dsn)
        except CONNECT_ERRORS as exc:
            line = describe_connect_error(exc, dsn, DATABASE_URL_SOURCE)
            if line is None:
                raise
            typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        try:
            return await fn(conn)
        except asyncpg.PostgresError as exc:
            # One line on stderr, the database's hint (what to do) joined on.
            hint = getattr(exc, "hint", None)
            typer.secho(f"error ({exc.sqlstate}): {exc.message}" + (f"; {hint}" if hint else ""),
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None
        finally:
            await conn.close()

    return asyncio.run(go())


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        console.print(f"[red]error:[/] {value!r} is not a run or snapshot id (a UUID)")
        raise typer.Exit(2) from None


def _short(value: Any, width: int = 60) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


@runs_app.command("list")
def runs_list(
    status: str = typer.Option(None, help="Only runs in this status."),
    limit: int = typer.Option(20, min=1, max=1000),
    database_url: str = DbOption,
) -> None:
    """The most recent runs, newest first."""

    async def go(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return await conn.fetch(  # type: ignore[no-any-return]
            "select r.id, o.name as org, r.status, r.n_job_lines, r.constraints, r.created_at,"
            " r.attempts, r.max_attempts, r.worker_id, r.error"
            " from allocation_planner_runs r join organizations o on o.id = r.organization_id"
            " where $1::text is null or r.status = upper($1)"
            " order by r.created_at desc limit $2", status, limit,
        )

    rows = _run(database_url, go)
    table = Table("run", "organisation", "status", "lines", "rule sets", "created", "attempts",
                  "worker", "error")
    for r in rows:
        table.add_row(str(r["id"]), _short(r["org"], 24), r["status"], str(r["n_job_lines"]),
                      ",".join(r["constraints"]), r["created_at"].strftime("%Y-%m-%d %H:%M:%S"),
                      f"{r['attempts']}/{r['max_attempts']}", r["worker_id"] or "",
                      _short(r["error"], 40))
    console.print(table)


@runs_app.command("show")
def runs_show(run_id: str, database_url: str = DbOption) -> None:
    """Every field of one run, its result metadata included."""
    rid = _uuid(run_id)

    async def go(conn: asyncpg.Connection) -> asyncpg.Record | None:
        return await conn.fetchrow("select * from allocation_planner_runs where id = $1", rid)

    row = _run(database_url, go)
    if row is None:
        console.print(f"[red]error:[/] no run {rid}")
        raise typer.Exit(1)
    out = {k: (json.loads(v) if k in ("options", "result_metadata") and isinstance(v, str) else v)
           for k, v in dict(row).items()}
    console.print_json(json.dumps(out, default=str))


@runs_app.command("logs")
def runs_logs(
    run_id: str,
    traceback: bool = typer.Option(False, "--traceback", help="Print stored tracebacks too."),
    database_url: str = DbOption,
) -> None:
    """The run's log lines from planner_execution_logs, oldest first."""
    rid = _uuid(run_id)

    async def go(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return await conn.fetch(  # type: ignore[no-any-return]
            "select logged_at, level, message, traceback from planner_execution_logs"
            " where planner_run_id = $1 order by logged_at, id", rid,
        )

    rows = _run(database_url, go)
    if not rows:
        console.print(f"no log lines for run {rid}")
    for r in rows:
        console.print(f"{r['logged_at']:%H:%M:%S.%f} {r['level']:<8} {r['message']}",
                      markup=False, highlight=False)
        if traceback and r["traceback"]:
            console.print(r["traceback"], markup=False, highlight=False)


@runs_app.command("cancel")
def runs_cancel(run_id: str, database_url: str = DbOption) -> None:
    """Cancel a run: PENDING at once, GENERATING at the listener's next heartbeat."""
    rid = _uuid(run_id)

    async def go(conn: asyncpg.Connection) -> str:
        async with acting_as(conn, "service_role") as c:
            await c.execute("select public.request_cancel($1)", rid)
        return str(await conn.fetchval(
            "select status from allocation_planner_runs where id = $1", rid))

    status = _run(database_url, go)
    console.print(f"run {rid}: cancellation requested (status now {status})")


@history_app.command("list")
def history_list(
    allocation_run: str = typer.Option(None, "--allocation-run", help="Only this allocation run."),
    limit: int = typer.Option(20, min=1, max=1000),
    database_url: str = DbOption,
) -> None:
    """Snapshots of replaced plans, newest first."""
    ar = _uuid(allocation_run) if allocation_run else None

    async def go(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return await conn.fetch(  # type: ignore[no-any-return]
            "select h.id, o.name as org, h.allocation_run_id, h.taken_at, h.n_lines,"
            " h.planner_run_id, h.restored_snapshot_id"
            " from job_lines_history h join organizations o on o.id = h.organization_id"
            " where $1::uuid is null or h.allocation_run_id = $1"
            " order by h.taken_at desc limit $2", ar, limit,
        )

    rows = _run(database_url, go)
    table = Table("snapshot", "organisation", "allocation run", "taken", "lines", "replaced by")
    for r in rows:
        by = (f"run {r['planner_run_id']}" if r["planner_run_id"]
              else f"restore of {r['restored_snapshot_id']}" if r["restored_snapshot_id"]
              else "")
        table.add_row(str(r["id"]), _short(r["org"], 24), str(r["allocation_run_id"]),
                      r["taken_at"].strftime("%Y-%m-%d %H:%M:%S"), str(r["n_lines"]), by)
    console.print(table)


@history_app.command("restore")
def history_restore(snapshot_id: str, database_url: str = DbOption) -> None:
    """Make a snapshot the current plan again (the plan it replaces is snapshotted first)."""
    sid = _uuid(snapshot_id)

    async def go(conn: asyncpg.Connection) -> Any:
        async with acting_as(conn, "service_role") as c:
            return await c.fetchval("select public.restore_job_lines($1)", sid)

    undo = _run(database_url, go)
    console.print(f"restored snapshot {sid}; the replaced plan is snapshot {undo}"
                  if undo else f"restored snapshot {sid} (there was no plan to snapshot)")


@history_app.command("purge")
def history_purge(
    allocation_run: str = typer.Option(
        ..., "--allocation-run", help="The DELETED allocation run whose history to remove."),
    database_url: str = DbOption,
) -> None:
    """Remove the snapshots and log lines of a deleted allocation run, for good.

    History outlives its allocation run on purpose (no cascade removes it), so this is the one
    way to remove it: explicit, by the service role, and refused (PL033) while the allocation
    run still exists.
    """
    ar = _uuid(allocation_run)

    async def go(conn: asyncpg.Connection) -> Any:
        async with acting_as(conn, "service_role") as c:
            return await c.fetchval("select planner_private.purge_history($1)::text", ar)

    counts = json.loads(_run(database_url, go))
    console.print(f"allocation run {ar}: purged {counts['snapshots']} snapshot(s) and "
                  f"{counts['logs']} log line(s)")
