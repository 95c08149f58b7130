"""`planner dev ...` and `planner demo`: the local stand-in for a Supabase project.

They reach the engine's `planner` command as a plugin: devstack/pyproject.toml declares
`register` below in the entry-point group `planner.commands`, which listener/cli.py loads.
"""

from __future__ import annotations

import asyncio
import json
import shlex

import typer

from devstack import packages, stack
from devstack.postgres import DevStackError
from listener.migrate import MigrationError

app = typer.Typer(help="The local stack: PostgreSQL 15 + pg_cron + wal2json + Realtime.",
                  no_args_is_help=True)


def register(planner: typer.Typer) -> None:
    """Entry point of the group `planner.commands`: add `dev ...` and `demo` to `planner`."""
    planner.add_typer(app, name="dev")
    planner.command("demo")(demo)


def demo(
    time_limit: float = typer.Option(15.0, "--time-limit", min=1, help="Solver time limit (s)."),
) -> None:
    """The product on the local stack, as a manager sees it (what `make demo` runs)."""
    from devstack.demo import run_demo

    raise typer.Exit(asyncio.run(run_demo(stack.up(), time_limit)))


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command()
def up() -> None:
    """Install what is missing, start the stack, apply scaffolding and migrations (idempotent)."""
    try:
        s = stack.up()
    except (DevStackError, MigrationError) as exc:
        _fail(exc)
        return
    typer.echo(f"local stack up: PostgreSQL {s.host}:{s.pg_port}, Realtime {s.supabase_url}")
    typer.echo(f"versions: {packages.describe(stack.versions(s))}")
    typer.echo(f"point tools at it with: eval \"$({stack.planner_command()} dev env)\"")


@app.command("packages")
def install_packages(
    upgrade: bool = typer.Option(
        False, "--upgrade",
        help="Bring every package to apt's newest candidate (what CI does), stopping the "
             "local stack first when one changes.",
    ),
) -> None:
    """Install the Debian packages the stack runs on (PostgreSQL 15, pg_cron, wal2json)."""
    try:
        changed = stack.install_packages(upgrade)
    except DevStackError as exc:
        _fail(exc)
        return
    verb = "installed" if changed else "already in place"
    typer.echo(f"Debian packages {verb}: {packages.describe(stack.versions())}")


@app.command()
def down() -> None:
    """Stop the stack; data is kept."""
    stack.down()
    typer.echo("local stack stopped (data kept; `planner dev reset` drops it)")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Show whether PostgreSQL and Realtime are running."""
    st = stack.status()
    if as_json:
        typer.echo(json.dumps(st, indent=2))
        return
    pg = st["postgres"]
    rt = st["realtime"]
    found = st["versions"]
    assert isinstance(pg, dict) and isinstance(rt, dict) and isinstance(found, dict)
    typer.echo(f"state dir : {st['state_dir']}")
    typer.echo(f"versions  : {packages.describe(found)}")
    running = f"running {pg['server_version']}" if pg["running"] else "stopped"
    typer.echo(f"postgres  : {running} (port {pg['port']})")
    typer.echo(f"realtime  : {'running' if rt['running'] else 'stopped'} (port {rt['port']})")


@app.command()
def reset(yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask.")) -> None:
    """Drop ALL local data and start clean."""
    if not yes:
        typer.confirm("Drop all local planner data?", abort=True)
    try:
        stack.reset()
    except DevStackError as exc:
        _fail(exc)
    typer.echo("local stack reset: empty database, migrations applied")


@app.command()
def env() -> None:
    """Print `export NAME=value` lines for the local stack."""
    for name, value in stack.env().items():
        typer.echo(f"export {name}={shlex.quote(value)}")


@app.command()
def seed(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    organizations: int = typer.Option(2, "--organizations", "-n", min=1,
                                      help="How many organisations to create."),
) -> None:
    """Create NEW demo organisations (users, teams, terms, demand) and print their ids."""
    # Imported here: the solver's generator is only needed by this command.
    from devstack import seed as seeding

    try:
        orgs = seeding.seed(organizations=organizations)
    except (OSError, DevStackError) as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps(seeding.as_json(orgs), indent=2))
        return
    for org in orgs:
        typer.echo(f"organisation {org.name}: {org.id}")
        typer.echo(f"  allocation run {org.allocation_run_name}: {org.allocation_run_id} "
                   f"({org.n_terms} terms, {org.n_teams} teams, {org.n_demand_rows} demand rows)")
        typer.echo(f"  planner {org.planner.email}: {org.planner.id}")
        typer.echo(f"  viewer  {org.viewer.email}: {org.viewer.id}")
        typer.echo(f"  admin   {org.admin.email}: {org.admin.id}")
        typer.echo(f"  try: {org.suggested_n_job_lines} lines under "
                   f"{', '.join(org.suggested_constraints)}")
    typer.echo("(access tokens for these users: planner dev seed --json)")
