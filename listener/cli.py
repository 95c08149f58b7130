"""The `planner` command: one entry point for operators, developers and the Procfile.

The engine's own commands are defined here and in `listener.ops` / `solver.cli`. Other
installed packages add theirs through the entry-point group `planner.commands`: each entry
point names a `register(app)` function that adds sub-commands to this Typer app. The dev
stand-in (`planner-devstack`, devstack/pyproject.toml) adds `planner dev ...` and
`planner demo` that way, so this module never imports it and a production install, which does
not have it, loads none of it.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

import typer
from loguru import logger

from listener import doctor
from listener import migrate as migrations
from listener.errors import CONNECT_ERRORS, ConfigurationError, describe_connect_error
from listener.ops import (
    DATABASE_URL_SOURCE,
    history_app,
    limits_app,
    require_database_url,
    runs_app,
)
from solver.cli import register as register_solver

PLUGIN_GROUP = "planner.commands"
# Commands the dev stand-in adds; without it they explain how to get them instead of
# "No such command".
DEV_COMMANDS = ("dev", "demo")
DEV_MISSING = (
    "error: `planner {name}` comes with the dev stand-in (package planner-devstack), which is "
    "not installed: run `uv sync` (or scripts/bootstrap.sh) in a checkout of the repository"
)

app = typer.Typer(
    help="Planner engine: job lines from CP-SAT, driven by Supabase Realtime.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(runs_app, name="runs")
app.add_typer(history_app, name="history")
app.add_typer(limits_app, name="limits")
register_solver(app)


def command_names(target: typer.Typer) -> set[str]:
    """The names `target` answers to (its commands and sub-apps), as Typer will spell them."""
    names = {info.name for info in target.registered_groups if info.name}
    for cmd in target.registered_commands:
        if cmd.name:
            names.add(cmd.name)
        elif cmd.callback is not None:
            names.add(cmd.callback.__name__.lower().replace("_", "-"))
    return names


def load_plugins(target: typer.Typer, group: str = PLUGIN_GROUP) -> list[str]:
    """Let every installed `group` entry point register its sub-commands on `target`.

    A plugin that fails to load costs one line on stderr, not the engine's commands: the
    Procfile's `planner listen` must start whatever else is installed. Returns the names of
    the plugins registered.
    """
    loaded: list[str] = []
    for ep in entry_points(group=group):
        try:
            register: Callable[[typer.Typer], None] = ep.load()
            register(target)
        except Exception as exc:  # any failure of foreign code; reported, then skipped
            typer.secho(f"warning: planner plugin {ep.name} ({ep.value}) not loaded: "
                        f"{type(exc).__name__}: {exc}", fg=typer.colors.YELLOW, err=True)
            continue
        loaded.append(ep.name)
    return loaded


def add_missing_dev_commands(target: typer.Typer) -> None:
    """Hidden stand-ins for `planner dev ...` / `planner demo` when no plugin added them:
    whatever follows, they print one line naming the fix and exit 1."""
    present = command_names(target)
    for name in DEV_COMMANDS:
        if name in present:
            continue

        def missing(ctx: typer.Context, _name: str = name) -> None:
            typer.secho(DEV_MISSING.format(name=_name), fg=typer.colors.RED, err=True)
            raise typer.Exit(1)

        target.command(
            name, hidden=True, add_help_option=False,
            context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        )(missing)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs.")) -> None:
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if verbose else "INFO", diagnose=False,
               format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}")


@app.command()
def migrate(
    database_url: str = typer.Option(
        None, "--database-url", envvar="DATABASE_URL",
        help="Target database (required: --database-url or $DATABASE_URL).",
    ),
    cron_database: str = typer.Option(
        None, "--cron-database", envvar="PLANNER_CRON_DATABASE",
        help="Only for a database that cannot have pg_cron itself (another database of the "
        "server runs it, e.g. test clones): schedule the sweeper from that database "
        "(docs/database.md). Hosted Supabase never needs it.",
    ),
) -> None:
    """Apply pending migrations to any database, a hosted Supabase project included."""
    dsn = require_database_url(database_url)
    try:
        done = asyncio.run(migrations.migrate(dsn, cron_database=cron_database or None))
    except migrations.MigrationError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except CONNECT_ERRORS as exc:
        line = describe_connect_error(exc, dsn, DATABASE_URL_SOURCE)
        if line is None:
            raise
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    # Each file was logged as it was applied; this is the summary.
    typer.echo(f"{len(done)} migration(s) applied")


app.command(name="doctor")(doctor.command)


@app.command()
def listen() -> None:
    """Run the listener (the Procfile process) until SIGTERM/SIGINT."""
    from pydantic import ValidationError

    from listener.app import Listener
    from listener.logs import configure_stdout
    from listener.settings import ListenerSettings, summarise_errors

    try:
        settings = ListenerSettings()  # type: ignore[call-arg]  # read from the environment
    except ValidationError as exc:
        typer.secho(f"error: invalid listener configuration: {summarise_errors(exc)} "
                    "(README.md#configuration)", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    configure_stdout(settings.log_level, settings.log_format)
    try:
        code = asyncio.run(Listener(settings).run())
    except ConfigurationError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


# Last, so that the engine's own commands are in place before any plugin sees the app.
load_plugins(app)
add_missing_dev_commands(app)
