"""`planner solve|validate|generate-instance`: the solver from the command line.

`solve` runs through the same child process as the listener (`solver.process.start_solve`),
so the command line exercises the production path: memory cap, progress stream, Ctrl-C as a
graceful stop that still writes the best plan found.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, get_args

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from solver.generate import generate
from solver.problem import ModelName, Plan, Problem
from solver.process import SolverProcessError, start_solve
from solver.rules import RULE_SETS
from solver.tiers import tiers_in_words
from solver.validate import validate_plan

console = Console(stderr=True)

_RULE_HELP = f"Repeatable. One of {', '.join(RULE_SETS)}."
EXIT_OK, EXIT_INFEASIBLE, EXIT_INVALID, EXIT_UNKNOWN, EXIT_ERROR = 0, 1, 2, 3, 4


def _errors(exc: ValidationError) -> list[str]:
    """One readable line per pydantic error ("where: what")."""
    out = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e["loc"]) or "problem"
        msg = e["msg"].removeprefix("Value error, ")
        out.append(f"{where}: {msg}")
    return out


def load_problem(path: Path) -> Problem | list[str]:
    """The validated problem, or the list of reasons it is invalid."""
    try:
        return Problem.model_validate_json(path.read_text())
    except ValidationError as exc:
        return _errors(exc)


def _write(plan: Plan, output: Path | None) -> None:
    text = plan.model_dump_json(indent=2)
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")
        console.print(f"plan written to [bold]{output}[/]")


def _summary(problem: Problem, plan: Plan) -> None:
    table = Table(title="Plan", show_header=False)
    table.add_row("status", plan.status)
    table.add_row("lines", str(len(plan.lines)))
    if plan.objective is not None:
        table.add_row("objective / bound", f"{plan.objective:g} / {plan.best_bound:g}")
        table.add_row("gap", f"{(plan.gap or 0) * 100:.2f} %")
    if plan.lines:
        table.add_row("tiers", tiers_in_words(plan))
    table.add_row("solve time", f"{plan.solve_seconds:.2f} s")
    table.add_row("solutions", str(plan.solutions))
    table.add_row("unfilled positions", str(sum(u.missing for u in plan.unfilled)))
    table.add_row("changed cells", str(plan.changed_cells))
    for k, v in plan.penalties.items():
        if not k.startswith("weight_"):
            table.add_row(k, str(v))
    if plan.peak_memory_mb is not None:
        table.add_row("peak memory", f"{plan.peak_memory_mb:.0f} MiB")
    if plan.lines:
        violations = validate_plan(problem, plan)
        table.add_row("validator", "ok" if not violations else f"{len(violations)} violation(s)")
    console.print(table)
    for line in plan.explanation or []:
        console.print(f"[yellow]{line}[/]")


async def _run(problem: Problem, memory_mb: int, workers: int | None) -> Plan:
    handle = start_solve(problem, memory_limit_mb=memory_mb, num_workers=workers)
    limit = problem.options.time_limit_seconds
    with Progress(
        TextColumn("[bold]solving[/]"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("solve", total=limit, info="starting")

        async def follow() -> None:
            async for p in handle.progress():
                info = f"{p.solutions} solution(s)"
                if p.objective is not None:
                    info += f"  objective {p.objective:g}  bound {p.best_bound or 0:g}"
                    info += f"  gap {(p.gap or 0) * 100:.1f} %"
                bar.update(task, completed=min(limit, p.elapsed_ms / 1000), info=info)

        follower = asyncio.create_task(follow())
        try:
            plan = await asyncio.shield(handle.result())
        except asyncio.CancelledError:  # Ctrl-C: stop gracefully, keep the best plan
            handle.stop()
            plan = await handle.result()
        await follower
    return plan


def register(app: typer.Typer) -> None:
    """Add the solver's commands to the root `planner` app."""

    @app.command("solve")
    def solve_cmd(
        problem_path: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                     help="Problem JSON.")],
        output: Annotated[Path | None, typer.Option("-o", "--output",
                                                    help="Write the plan here.")] = None,
        time_limit: Annotated[float | None, typer.Option("--time-limit", help="Seconds.")] = None,
        seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
        workers: Annotated[int | None, typer.Option("--workers", help="CP-SAT workers.")] = None,
        memory_mb: Annotated[int, typer.Option("--memory-mb",
                                               help="Memory cap of the solver (MiB).")] = 2048,
        deterministic: Annotated[bool, typer.Option(
            "--deterministic", help="One worker, fixed seed: reproducible plans.")] = False,
        model: Annotated[str | None, typer.Option(
            "--model", help="lines (one variable per line x term x team) or patterns "
            "(column generation over classes of interchangeable teams).")] = None,
    ) -> None:
        """Solve a problem in a child process, with live progress; Ctrl-C stops gracefully."""
        loaded = load_problem(problem_path)
        if isinstance(loaded, list):
            for e in loaded:
                console.print(f"[red]invalid problem:[/] {e}")
            _write(Plan(status="INVALID", explanation=loaded), output)
            raise typer.Exit(EXIT_INVALID)
        updates: dict[str, object] = {}
        if time_limit is not None:
            updates["time_limit_seconds"] = time_limit
        if seed is not None:
            updates["seed"] = seed
        if deterministic:
            updates["deterministic"] = True
        if model is not None:
            if model not in get_args(ModelName):
                console.print(f"[red]unknown model {model!r}:[/] use --model "
                              + " or --model ".join(get_args(ModelName)))
                raise typer.Exit(EXIT_INVALID)
            updates["model"] = model
        problem = loaded.model_copy(
            update={"options": loaded.options.model_copy(update=updates)})
        try:
            plan = asyncio.run(_run(problem, memory_mb, workers))
        except SolverProcessError as exc:
            console.print(f"[red]solver failed:[/] {exc}")
            raise typer.Exit(EXIT_ERROR) from None
        _summary(problem, plan)
        _write(plan, output)
        code = {"OPTIMAL": EXIT_OK, "FEASIBLE": EXIT_OK, "INFEASIBLE": EXIT_INFEASIBLE}
        raise typer.Exit(code.get(plan.status, EXIT_UNKNOWN))

    @app.command("validate")
    def validate_cmd(
        problem_path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
        plan_path: Annotated[Path, typer.Argument(exists=True, dir_okay=False)],
    ) -> None:
        """Check a plan against a problem and its rule sets; exit 1 listing the violations."""
        loaded = load_problem(problem_path)
        if isinstance(loaded, list):
            for e in loaded:
                typer.echo(f"invalid problem: {e}")
            raise typer.Exit(EXIT_INVALID)
        try:
            plan = Plan.model_validate_json(plan_path.read_text())
        except ValidationError as exc:
            for e in _errors(exc):
                typer.echo(f"invalid plan: {e}")
            raise typer.Exit(EXIT_INVALID) from None
        violations = validate_plan(loaded, plan)
        for v in violations:
            typer.echo(v)
        if violations:
            typer.echo(f"{len(violations)} violation(s)")
            raise typer.Exit(1)
        typer.echo(f"plan is valid ({len(plan.lines)} lines, status {plan.status})")

    @app.command("generate-instance")
    def generate_cmd(
        lines: Annotated[int, typer.Option("--lines", min=1)],
        terms: Annotated[int, typer.Option("--terms", min=1)],
        teams: Annotated[int, typer.Option("--teams", min=5)],
        rule_set: Annotated[list[str], typer.Option("--rule-set", help=_RULE_HELP)],
        output: Annotated[Path, typer.Option("-o", "--output")],
        seed: Annotated[int, typer.Option("--seed")] = 0,
        tight: Annotated[bool, typer.Option(
            "--tight", help="min = planted count, max = it or one more, for every used cell "
            "(zero shortfall is an exact cover).")] = False,
        site_subspecialties: Annotated[bool, typer.Option(
            "--site-subspecialties", help="Subspecialties distinct per site (more classes of "
            "interchangeable teams).")] = False,
    ) -> None:
        """Write a realistic synthetic problem that is feasible by construction."""
        try:
            problem = generate(lines=lines, terms=terms, teams=teams, rule_sets=rule_set,
                               seed=seed, tight=tight, site_subspecialties=site_subspecialties)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_INVALID) from None
        output.write_text(json.dumps(problem.model_dump(mode="json", exclude_none=True),
                                     indent=1) + "\n")
        typer.echo(f"{output}: {lines} lines, {terms} terms, {len(problem.teams)} teams, "
                   f"{len(problem.demand)} demand rows, rule sets {', '.join(rule_set)}"
                   + (" (tight)" if tight else ""))
