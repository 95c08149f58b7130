"""The `planner` command: one entry point for operators, developers and the Procfile."""

from __future__ import annotations

import asyncio
import sys

import typer
from loguru import logger

from devstack.cli import app as dev_app
from listener import migrate as migrations
from listener.ops import history_app, runs_app
from solver.cli import register as register_solver

app = typer.Typer(
    help="Planner engine: job lines from CP-SAT, driven by Supabase Realtime.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.add_typer(dev_app, name="dev")
app.add_typer(runs_app, name="runs")
app.add_typer(history_app, name="history")
register_solver(app)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logs.")) -> None:
    logger.remove()
    logger.add(sys.stderr, level="DEBUG" if verbose else "INFO", diagnose=False,
               format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}")


@app.command()
def migrate(
    database_url: str = typer.Option(
        None, "--database-url", envvar="DATABASE_URL",
        help="Target database (default: $DATABASE_URL, else the local stack).",
    ),
) -> None:
    """Apply pending migrations to any database, a hosted Supabase project included."""
    if database_url is None:
        from devstack.settings import DevSettings

        database_url = DevSettings().dsn()
    try:
        done = asyncio.run(migrations.migrate(database_url))
    except migrations.MigrationError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except (OSError, ConnectionError) as exc:
        typer.secho(f"error: cannot reach the database: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    # Each file was logged as it was applied; this is the summary.
    typer.echo(f"{len(done)} migration(s) applied")


@app.command()
def listen() -> None:
    """Run the listener (the Procfile process) until SIGTERM/SIGINT."""
    from pydantic import ValidationError

    from listener.app import Listener
    from listener.logs import configure_stdout
    from listener.settings import ListenerSettings

    try:
        settings = ListenerSettings()  # type: ignore[call-arg]  # read from the environment
    except ValidationError as exc:
        typer.secho("error: invalid listener configuration:", fg=typer.colors.RED, err=True)
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            typer.secho(f"  {name}: {err['msg']}", err=True)
        typer.secho("see README.md#configuration", err=True)
        raise typer.Exit(2) from None
    configure_stdout(settings.log_level, settings.log_format)
    raise typer.Exit(asyncio.run(Listener(settings).run()))


@app.command()
def demo(
    time_limit: float = typer.Option(15.0, "--time-limit", min=1, help="Solver time limit (s)."),
) -> None:
    """The product on the local stack, as a manager sees it (what `make demo` runs)."""
    from devstack import stack
    from devstack.demo import run_demo

    raise typer.Exit(asyncio.run(run_demo(stack.up(), time_limit)))
