"""Operator commands: `planner runs ...`, `planner history ...` and `planner limits ...`.

They connect with `--database-url` or `DATABASE_URL` (an operator's connection; there is no
default, so a production command never lands on a local database by accident) and act through
the same functions the UI uses, as `service_role`, so an operator's cancel or restore goes
through exactly the checks and logging a manager's would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
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


# -- limits and the ledger (issue 13) ------------------------------------------------------------
limits_app = typer.Typer(
    help="Show and change an organisation's limits (tier, overrides) and its ledger.",
    no_args_is_help=True,
)

#: The values of planner_engine.limits an operator sets, in the order they are shown.
LIMIT_KEYS = (
    "max_job_lines", "max_teams", "max_terms", "max_demand_rows", "max_options_bytes",
    "max_constraints", "default_time_limit_s", "max_time_limit_s", "runs_per_hour",
    "queued_runs", "solver_seconds_per_hour", "solver_seconds_per_day", "restores_per_hour",
)
#: A tier's name, as the table's CHECK has it.
TIER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")
#: What `KEY=inherit` stores: NULL, the tier's (or the default's) value applies.
INHERIT = "inherit"


def _fail(line: str, code: int = 1) -> typer.Exit:
    """Print one error line; the caller raises the returned Exit."""
    typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def parse_assignments(pairs: list[str]) -> dict[str, int | None]:
    """`KEY=VALUE` arguments: VALUE a whole number >= 0, or `inherit` (NULL). One line naming
    the bad argument otherwise (exit 2, a usage error)."""
    values: dict[str, int | None] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().lower()
        if not sep or key not in LIMIT_KEYS:
            raise _fail(f"{pair!r} is not KEY=VALUE with a known limit; limits: "
                        + ", ".join(LIMIT_KEYS), 2)
        raw = raw.strip()
        if raw.lower() == INHERIT:
            values[key] = None
        elif raw.isdigit() and int(raw) < 2**31:
            values[key] = int(raw)
        else:
            raise _fail(f"{pair}: the value must be a whole number from 0 to 2147483647, or "
                        f"{INHERIT!r}", 2)
    return values


async def find_organization(conn: asyncpg.Connection, org: str) -> tuple[str, str] | None:
    """(id, name) of the organisation given by id or by its exact name."""
    try:
        org_id: uuid.UUID | None = uuid.UUID(org)
    except ValueError:
        org_id = None
    rows = await conn.fetch(
        "select id::text, name from organizations where id = $1 or name = $2 limit 2",
        org_id, org)
    if len(rows) != 1:
        return None
    return str(rows[0]["id"]), str(rows[0]["name"])


def _org_not_found(org: str) -> typer.Exit:
    return _fail(f"no organisation with id or name {org!r} (or more than one with that "
                 "name: give its id; `planner runs list` shows organisations by name)")


@limits_app.command("show")
def limits_show(
    org: str = typer.Argument(None, help="Organisation id or exact name; none: the default "
                                         "row and the tiers."),
    database_url: str = DbOption,
) -> None:
    """The limits in force for an organisation (and where each comes from) and its usage, or
    without an organisation the default row and every tier."""

    async def go(conn: asyncpg.Connection) -> Any:
        if org is None:
            return None, await conn.fetch(
                "select * from planner_engine.limits where tier is not null"
                " order by tier <> 'default', tier")
        found = await find_organization(conn, org)
        if found is None:
            return None, None
        org_id = found[0]
        rows = {
            "resolved": await conn.fetchrow("select * from planner_private.limits_of($1)",
                                            org_id),
            "own": await conn.fetchrow(
                "select * from planner_engine.limits where organization_id = $1", org_id),
            "hour": await conn.fetchrow(
                "select * from planner_private.usage_in($1, interval '1 hour')", org_id),
            "day": await conn.fetchrow(
                "select * from planner_private.usage_in($1, interval '1 day')", org_id),
            "queued": await conn.fetchval(
                "select count(*) from planner_private.usage_ledger"
                " where organization_id = $1 and settled_at is null", org_id),
        }
        tier = rows["own"]["on_tier"] if rows["own"] is not None else None
        rows["tier"] = (await conn.fetchrow(
            "select * from planner_engine.limits where tier = $1", tier) if tier else None)
        return found, rows

    found, rows = _run(database_url, go)
    if org is None:
        # One column per tier (empty: the default's value applies).
        table = Table("limit", *(r["tier"] for r in rows))
        for k in LIMIT_KEYS:
            table.add_row(k, *("" if r[k] is None else str(r[k]) for r in rows))
        console.print(table)
        return
    if rows is None:
        raise _org_not_found(org)
    own, tier = rows["own"], rows["tier"]
    resolved, hour, day = rows["resolved"], rows["hour"], rows["day"]
    tier_name = resolved["tier"]
    console.print(f"organisation {found[1]} ({found[0]}), tier {tier_name}")
    usage = {
        "runs_per_hour": f"{hour['runs']} in the last hour",
        "queued_runs": f"{rows['queued']} pending or generating",
        "solver_seconds_per_hour": f"{hour['solver_seconds']:.0f} in the last hour",
        "solver_seconds_per_day": f"{day['solver_seconds']:.0f} in the last 24 hours",
        "restores_per_hour": f"{hour['restores']} in the last hour",
    }
    table = Table("limit", "value", "from", "used")
    for k in LIMIT_KEYS:
        source = ("organisation" if own is not None and own[k] is not None
                  else f"tier {tier_name}" if tier is not None and tier[k] is not None
                  else "default")
        table.add_row(k, str(resolved[k]), source, usage.get(k, ""))
    console.print(table)


ASSIGNMENTS = typer.Argument(
    None, help="KEY=VALUE (a whole number, or 'inherit' to clear an override).")


@limits_app.command("set")
def limits_set(
    assignments: list[str] = ASSIGNMENTS,
    org: str = typer.Option(None, "--org", help="Organisation (id or exact name) to change."),
    tier: str = typer.Option(None, "--tier",
                             help="The tier to change or create ('default': the defaults)."),
    on_tier: str = typer.Option(None, "--on-tier",
                                help="Put the organisation (--org) on this tier ('none': off)."),
    database_url: str = DbOption,
) -> None:
    """Change an organisation's own limits or tier, or a tier's values."""
    if (org is None) == (tier is None):
        raise _fail("give exactly one of --org ORG and --tier NAME", 2)
    for name in (tier, None if on_tier is None or on_tier.lower() == "none" else on_tier):
        if name is not None and not TIER_NAME.fullmatch(name):
            raise _fail(f"{name!r} is not a tier name: lower-case letters, digits, '_' and '-', "
                        "starting with a letter, at most 40", 2)
    if on_tier is not None and org is None:
        raise _fail("--on-tier puts an organisation on a tier: use it with --org", 2)
    values = parse_assignments(assignments or [])
    if tier == "default" and any(v is None for v in values.values()):
        raise _fail("the default tier has every value: 'inherit' is for tiers and "
                    "organisations", 2)
    if not values and on_tier is None:
        raise _fail("nothing to change: give KEY=VALUE arguments (or --on-tier)", 2)

    async def go(conn: asyncpg.Connection) -> str | None:
        async with conn.transaction():
            if tier is not None:
                await conn.execute("insert into planner_engine.limits (tier) values ($1)"
                                   " on conflict (tier) do nothing", tier)
                where, key = "tier = $1", tier
                label = f"tier {tier}"
            else:
                found = await find_organization(conn, org)
                if found is None:
                    return None
                await conn.execute("insert into planner_engine.limits (organization_id)"
                                   " values ($1) on conflict (organization_id) do nothing",
                                   found[0])
                where, key = "organization_id = $1::uuid", found[0]
                label = f"organisation {found[1]}"
                if on_tier is not None:
                    plan = None if on_tier.lower() == "none" else on_tier
                    if plan is not None and not await conn.fetchval(
                            "select exists (select 1 from planner_engine.limits"
                            " where tier = $1)", plan):
                        raise LookupError(plan)
                    await conn.execute(f"update planner_engine.limits set on_tier = $2"
                                       f" where {where}", key, plan)
            for k, v in values.items():  # k is one of LIMIT_KEYS (parse_assignments)
                await conn.execute(f"update planner_engine.limits set {k} = $2,"
                                   f" updated_at = now() where {where}", key, v)
            return label

    try:
        label = _run(database_url, go)
    except LookupError as exc:
        raise _fail(f"no tier {exc.args[0]!r}: create it first with `planner limits set "
                    f"--tier {exc.args[0]} KEY=VALUE`") from None
    if label is None:
        raise _org_not_found(org)
    changes = [f"{k}={'inherit' if v is None else v}" for k, v in values.items()]
    if on_tier is not None:
        changes.insert(0, f"tier {on_tier}")
    console.print(f"{label}: {', '.join(changes)}")


@limits_app.command("ledger")
def limits_ledger(
    org: str = typer.Argument(..., help="Organisation id or exact name."),
    limit: int = typer.Option(20, min=1, max=1000),
    database_url: str = DbOption,
) -> None:
    """The organisation's ledger, newest first: each run's reserved and used solver seconds
    (entries stay when runs are deleted) and each restore."""

    async def go(conn: asyncpg.Connection) -> Any:
        found = await find_organization(conn, org)
        if found is None:
            return None
        return await conn.fetch(
            "select at, kind, run_id, allocation_run_id, reserved_s, used_s, settled_at,"
            " outcome from planner_private.usage_ledger where organization_id = $1"
            " order by at desc, id desc limit $2", found[0], limit)

    rows = _run(database_url, go)
    if rows is None:
        raise _org_not_found(org)
    table = Table("at", "kind", "run", "allocation run", "reserved s", "used s", "outcome")
    for r in rows:
        table.add_row(r["at"].strftime("%Y-%m-%d %H:%M:%S"), r["kind"],
                      str(r["run_id"] or ""), str(r["allocation_run_id"]), str(r["reserved_s"]),
                      f"{r['used_s']:.1f}", r["outcome"] or "queued")
    console.print(table)


@limits_app.command("forgive")
def limits_forgive(
    org: str = typer.Argument(..., help="Organisation id or exact name."),
    hours: int = typer.Option(24, min=1, max=24 * 7,
                              help="Give back what was used in this many last hours."),
    database_url: str = DbOption,
) -> None:
    """Give an organisation its budget back: delete its settled ledger entries (runs and
    restores) of the last HOURS hours, so its hourly and daily budgets count from zero again
    (e.g. after runs an incident made it repeat). Queued entries stay: they are runs that are
    PENDING or GENERATING now, and their settlement still follows."""

    async def go(conn: asyncpg.Connection) -> Any:
        found = await find_organization(conn, org)
        if found is None:
            return None
        row = await conn.fetchrow(
            "with gone as (delete from planner_private.usage_ledger"
            " where organization_id = $1 and settled_at is not null"
            " and at > now() - make_interval(hours => $2) returning kind, used_s)"
            " select count(*) filter (where kind = 'run') as runs,"
            " count(*) filter (where kind = 'restore') as restores,"
            " coalesce(sum(used_s), 0) as used_s from gone", found[0], hours)
        return found[1], row

    result = _run(database_url, go)
    if result is None:
        raise _org_not_found(org)
    name, row = result
    console.print(f"{name}: gave back {row['runs']} run(s) ({float(row['used_s']):.1f} solver"
                  f" seconds) and {row['restores']} restore(s) of the last {hours} h")


@limits_app.command("prune")
def limits_prune(
    days: int = typer.Option(2, min=2, max=3650,
                             help="Delete settled entries older than this many days."),
    database_url: str = DbOption,
) -> None:
    """Housekeeping: delete settled ledger entries older than DAYS days, for every
    organisation. At least 2, so the daily budget (the longest window) is never shortened."""

    async def go(conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval(
            "with gone as (delete from planner_private.usage_ledger where settled_at is not null"
            " and at < now() - make_interval(days => $1) returning 1) select count(*) from gone",
            days))

    n = _run(database_url, go)
    console.print(f"deleted {n} ledger entr{'y' if n == 1 else 'ies'} older than {days} days")
