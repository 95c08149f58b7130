"""Solve loop: parameters, progress callback, cancellation, plan extraction, explanations.

Kept apart from the model (`solver.model`) in the cpsat-primer style: the model says *what* a
valid plan is, this module says *how hard and how long* to search for one and what to report.
`solve()` runs in the caller's process; `solver.process.start_solve` wraps it in a child.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from loguru import logger
from ortools.sat.python import cp_model

from solver.explain import explain_infeasible
from solver.heuristic import construct
from solver.heuristic import unfilled_of as heuristic_unfilled
from solver.model import (
    FAIRNESS_CATEGORIES,
    LineModel,
    OutOfTime,
    build,
    fairness_categories,
    interchangeable_groups,
    tier_weights,
    unfilled_expr,
)
from solver.problem import Plan, PlanLine, Problem, Progress, Status, Unfilled
from solver.validate import changed_cells_of, unfilled_of

ProgressFn = Callable[[Progress], None]

#: Randomised constructions tried (within a time budget) for the hint.
GREEDY_ATTEMPTS = 40

#: What a solve may use beyond its time limit to finish: the infeasibility explanation and
#: turning the best solution into a Plan (issue 12: "within the limit plus 2 s").
GRACE_S = 1.5

#: Minimum time between two progress messages (first and last are always sent).
PROGRESS_INTERVAL_S = 0.25


def default_workers() -> int:
    """All cores up to 8: CP-SAT is a portfolio, more workers than cores only add overhead."""
    return max(1, min(8, os.cpu_count() or 1))


def parameters(problem: Problem, num_workers: int | None) -> cp_model.SatParameters:
    """Search parameters from the problem's options (kept out of the model on purpose)."""
    opts = problem.options
    params = cp_model.SatParameters()
    params.max_time_in_seconds = opts.time_limit_seconds
    params.random_seed = opts.seed
    if opts.deterministic:
        # One worker and a fixed seed: same problem, same plan, whatever the machine load.
        # (interleave_search would keep the portfolio deterministic, but OR-Tools 9.15 aborts
        # with "Check failed: heuristics.fixed_search != nullptr" when it gets a hint for an
        # infeasible model, so we do not use it.)
        params.num_workers = 1
    else:
        params.num_workers = num_workers or default_workers()
    params.catch_sigint_signal = False  # the caller (CLI, child process) owns signals
    return params


class _Progress(cp_model.CpSolverSolutionCallback):
    """Counts solutions and forwards objective/bound/gap, throttled to one message per interval.

    CP-SAT calls it from worker threads, hence the lock. The objective reported is always the
    full weighted objective (evaluated on each solution), so phase 1 (unfilled only) and phase 2
    (all tiers) produce one monotone series.
    """

    def __init__(self, on_progress: ProgressFn | None, time_limit_s: float) -> None:
        super().__init__()
        self._on_progress = on_progress
        self._limit_ms = int(time_limit_s * 1000)
        self._start = time.monotonic()
        self._last_sent = -1.0
        self._lock = threading.Lock()
        self.solutions = 0
        self.objective: float | None = None
        self.bound: float | None = None
        self.first_solution_s: float | None = None
        self.full_objective: cp_model.LinearExprT = 0
        self.bound_scale = 1

    def on_solution_callback(self) -> None:
        value = float(self.value(self.full_objective))
        bound = self.best_objective_bound * self.bound_scale
        with self._lock:
            self.solutions += 1
            if self.objective is None or value < self.objective:
                self.objective = value
            self._raise_bound(bound)
            if self.first_solution_s is None:
                self.first_solution_s = time.monotonic() - self._start
        self.emit()

    def external_solution(self, value: float) -> None:
        """A plan found outside CP-SAT (the greedy construction) counts as a solution."""
        with self._lock:
            self.solutions += 1
            if self.objective is None or value < self.objective:
                self.objective = value
            if self.bound is None:
                self.bound = 0.0
            if self.first_solution_s is None:
                self.first_solution_s = time.monotonic() - self._start
        self.emit(force=True)

    def final(self, objective: float, bound: float) -> None:
        """The last message always describes the plan actually returned."""
        with self._lock:
            self.objective, self.bound = objective, bound
        self.emit(force=True)

    def _raise_bound(self, bound: float) -> None:
        if self.bound is None or bound > self.bound:
            self.bound = bound
        if self.objective is not None and self.bound > self.objective:
            self.bound = self.objective

    def on_bound(self, bound: float) -> None:
        with self._lock:
            self._raise_bound(bound * self.bound_scale)
        self.emit()

    def snapshot(self) -> Progress:
        return Progress(
            solutions=self.solutions,
            objective=self.objective,
            best_bound=self.bound,
            gap=_gap(self.objective, self.bound),
            elapsed_ms=int((time.monotonic() - self._start) * 1000),
            time_limit_ms=self._limit_ms,
        )

    def emit(self, force: bool = False) -> None:
        if self._on_progress is None:
            return
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_sent < PROGRESS_INTERVAL_S:
                return
            self._last_sent = now
            snap = self.snapshot()
        try:
            self._on_progress(snap)
        except Exception:  # a broken listener must not kill the search
            logger.exception("progress callback failed")


def _gap(objective: float | None, bound: float | None) -> float | None:
    if objective is None or bound is None:
        return None
    return abs(objective - bound) / max(1.0, abs(objective))


def _stop_watcher(
    stop: threading.Event, solver: cp_model.CpSolver, done: threading.Event
) -> threading.Thread:
    """Turn `stop.set()` into `solver.stop_search()` (CP-SAT then returns its best plan).

    `stop_search()` is a no-op until `solve()` has created CP-SAT's solve wrapper, so a stop
    that lands just as a phase starts would be lost: keep asking until the search is over.
    """

    def run() -> None:
        announced = False
        while not done.is_set():
            if stop.wait(0.05):
                if not announced:
                    logger.info("stop requested: stopping the search")
                    announced = True
                solver.stop_search()
                done.wait(0.05)

    thread = threading.Thread(target=run, name="solver-stop", daemon=True)
    thread.start()
    return thread


_STATUS: dict[cp_model.CpSolverStatus, Status] = {
    cp_model.OPTIMAL: "OPTIMAL",
    cp_model.FEASIBLE: "FEASIBLE",
    cp_model.INFEASIBLE: "INFEASIBLE",
    cp_model.UNKNOWN: "UNKNOWN",
    cp_model.MODEL_INVALID: "INVALID",
}


def _hint_rows(lm: LineModel, rows: list[list[int]]) -> None:
    """Complete hint from a constructed plan (team index per line and term)."""
    lm.model.clear_hints()  # type: ignore[no-untyped-call]
    for (line, t, k), v in lm.x.items():
        lm.model.add_hint(v, rows[line][t] == k)


def _greedy(
    problem: Problem, budget_s: float, deadline: float
) -> tuple[list[list[int]], int] | None:
    """Best of a few randomised constructions (within `budget_s`, never past `deadline`)."""
    started = time.monotonic()
    end = min(deadline, started + budget_s)
    best: tuple[list[list[int]], int] | None = None
    seed = problem.options.seed
    for attempt in range(GREEDY_ATTEMPTS):
        rows = construct(problem, seed=seed * 1000 + attempt, deadline=deadline)
        if rows is not None:
            u = heuristic_unfilled(problem, rows)
            if best is None or u < best[1]:
                best = (rows, u)
            if u == 0:
                break
        if time.monotonic() > end:
            break
    return best


def _symmetry_order(problem: Problem, rows: list[list[int]]) -> list[list[int]]:
    """Rows reordered inside each interchangeable group to respect symmetry breaking."""
    rows = [list(r) for r in rows]
    if problem.options.symmetry != "none":
        dm = problem.demand_map()
        teams_by_term = [[k for k, team in enumerate(problem.teams) if (team.id, term.id) in dm]
                         for term in problem.terms]
        pos = [{k: i for i, k in enumerate(ks)} for ks in teams_by_term]
        for group in interchangeable_groups(problem):
            ordered = sorted((rows[ln] for ln in group),
                             key=lambda r: [pos[t][k] for t, k in enumerate(r)])
            for ln, r in zip(group, ordered, strict=True):
                rows[ln] = r
    return rows


def change_max(problem: Problem) -> int:
    """Previous cells that may change (the changed-cells tier's range), as the model counts."""
    if problem.previous_plan is None or problem.options.stability == "off":
        return 0
    keep = problem.options.keep_pinned
    return sum(1 for p in problem.previous_plan.lines for t in p.rotations
               if not (keep and t in p.pinned))


def _hint_solution(lm: LineModel, solver: cp_model.CpSolver) -> None:
    """Complete hint from the phase-1 solution (CP-SAT profits most from complete hints)."""
    lm.model.clear_hints()  # type: ignore[no-untyped-call]
    for v in lm.x.values():
        lm.model.add_hint(v, solver.boolean_value(v))


def _search(
    lm: LineModel,
    params: cp_model.SatParameters,
    seconds: float,
    callback: _Progress,
    stop: threading.Event | None,
) -> tuple[Status, cp_model.CpSolver]:
    solver = cp_model.CpSolver()
    solver.parameters.copy_from(params)
    # CP-SAT overshoots its own limit by ~0.5 s on a 100k-literal model (measured at 250
    # lines, more on a loaded box): stop it a little early so the plan is back in time.
    solver.parameters.max_time_in_seconds = max(0.01, seconds - min(0.5, 0.05 * seconds))
    solver.best_bound_callback = callback.on_bound
    done = threading.Event()
    if stop is not None:
        _stop_watcher(stop, solver, done)
    try:
        code = solver.solve(lm.model, callback)
    finally:
        done.set()
    return _STATUS.get(code, "UNKNOWN"), solver


def solve(
    problem: Problem,
    *,
    on_progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    num_workers: int | None = None,
) -> Plan:
    """Solve in this process.

    Returns OPTIMAL/FEASIBLE with lines, INFEASIBLE with an explanation, or UNKNOWN when the
    time ran out (or a stop came) before any plan was found.

    Two phases, the lexicographic pattern of the cpsat-primer: (1) minimise unfilled positions
    alone; (2) fix that number and minimise the full weighted objective, hinted with phase 1's
    plan. Measured: proving the fairness tier in one weighted solve stalled at 125 lines (the LP
    trades fractional shortfall against fairness); with unfilled fixed, the fairness bound
    follows by propagation.
    """
    if problem.options.model == "patterns":
        from solver.patterns import solve_patterns  # imports this module

        return solve_patterns(problem, on_progress=on_progress, stop=stop,
                              num_workers=num_workers)
    started = time.monotonic()
    limit = problem.options.time_limit_seconds
    deadline = started + limit
    callback = _Progress(on_progress, limit)
    categories = fairness_categories(problem)
    weights = tier_weights(problem, len(categories), change_max(problem))
    if stop is not None and stop.is_set():
        return Plan(status="UNKNOWN", solve_seconds=time.monotonic() - started)
    # The construction runs before the model is built: at 1,000 lines building takes longer
    # than a short limit, and the constructed plan is then the best plan there is.
    greedy_objective = -1.0
    greedy = None
    if problem.options.construction != "off":
        greedy = _greedy(problem, budget_s=min(1.0, limit / 10), deadline=deadline)
    if greedy is not None:
        greedy = (_symmetry_order(problem, greedy[0]), greedy[1])
        logger.debug("greedy hint: {} unfilled", greedy[1])
        tiers = _tier_totals(evaluate(problem, categories, greedy[0]))
        greedy_objective = float(sum(weights[k] * v for k, v in tiers.items()))
        callback.external_solution(greedy_objective)
    shortcut = problem.options.construction == "full"
    if greedy is not None and greedy_objective == 0 and shortcut:
        # Every tier is a non-negative count, so a constructed plan scoring 0 is optimal by
        # definition: no search can improve it (and no model needs building).
        return plan_from_rows(problem, greedy[0], status="OPTIMAL", weights=weights,
                              categories=categories, callback=callback, started=started)
    try:
        lm = build(problem, deadline=deadline)
    except OutOfTime:
        logger.info("time limit reached while building the model ({:.1f}s)",
                    time.monotonic() - started)
        return _best_so_far(problem, greedy, weights, categories, callback, started)
    callback.full_objective = lm.objective
    logger.debug("model built in {:.2f}s", time.monotonic() - started)
    params = parameters(problem, num_workers)
    unfilled = unfilled_expr(lm)
    if greedy is not None:
        _hint_rows(lm, greedy[0])
    status: Status
    solver: cp_model.CpSolver | None = None
    if greedy is not None and greedy[1] == 0:
        # The construction already fills every minimum: tier 1 is proven 0, skip phase 1.
        status, best_unfilled = "OPTIMAL", 0
    else:
        # Phase 1: unfilled positions only (bound reported on the full objective's scale).
        lm.model.minimize(unfilled)
        callback.bound_scale = lm.weights["unfilled"]
        status, solver = _search(lm, params, deadline - time.monotonic(), callback, stop)
        best_unfilled = round(solver.objective_value) if status in ("OPTIMAL", "FEASIBLE") else 0
        logger.debug("phase 1: {} ({:.2f}s)", status, time.monotonic() - started)
    if status in ("OPTIMAL", "FEASIBLE"):
        remaining = deadline - time.monotonic()
        if remaining > 0.05 and not (stop is not None and stop.is_set()):
            if solver is not None:
                _hint_solution(lm, solver)
            lm.model.add(unfilled <= best_unfilled)
            lm.model.minimize(lm.objective)
            callback.bound_scale = 1
            status2, solver2 = _search(lm, params, remaining, callback, stop)
            logger.debug("phase 2: {} ({:.2f}s)", status2, time.monotonic() - started)
            if status2 in ("OPTIMAL", "FEASIBLE"):
                if status == "FEASIBLE":
                    status2 = "FEASIBLE"  # phase 1 not proven: the whole is not proven
                status, solver = status2, solver2
            elif solver is not None:
                status = "FEASIBLE"  # keep the phase-1 plan
            else:
                status = status2
        elif solver is not None:
            status = "FEASIBLE"  # the remaining tiers were not optimised
        else:
            status = "UNKNOWN"
    if status == "INFEASIBLE":
        callback.emit(force=True)
        return Plan(
            status="INFEASIBLE",
            solve_seconds=time.monotonic() - started,
            explanation=explain_infeasible(problem, explain_deadline(started, limit)),
            solutions=0,
        )
    if solver is not None and status in ("OPTIMAL", "FEASIBLE"):
        return plan_from_rows(problem, _rows_from(lm, solver), status=status,
                              weights=lm.weights, categories=list(lm.spreads),
                              callback=callback, started=started)
    return _best_so_far(problem, greedy, lm.weights, categories, callback, started)


def explain_deadline(started: float, limit: float) -> float:
    """The explanation may use the time left plus GRACE_S (the limit covers it, issue 12)."""
    return started + limit + GRACE_S


def _best_so_far(
    problem: Problem,
    greedy: tuple[list[list[int]], int] | None,
    weights: dict[str, int],
    categories: list[str],
    callback: _Progress,
    started: float,
) -> Plan:
    """Stopped or out of time before CP-SAT found anything: the construction is still a
    valid plan, and "the best plan so far"; without one, UNKNOWN says so in words."""
    if greedy is not None and (greedy[1] == 0 or not problem.options.strict_minimum):
        return plan_from_rows(problem, greedy[0], status="FEASIBLE", weights=weights,
                              categories=categories, callback=callback, started=started)
    callback.emit(force=True)
    limit = problem.options.time_limit_seconds
    return Plan(status="UNKNOWN", solve_seconds=time.monotonic() - started,
                solutions=callback.solutions,
                explanation=[f"No plan was found within the time limit of {limit:g} s; "
                             "raise options.time_limit_seconds or ask for fewer job lines."])


def plan_from_rows(
    problem: Problem,
    rows: list[list[int]],
    *,
    status: Status,
    weights: dict[str, int],
    categories: list[str],
    callback: _Progress,
    started: float,
    bound: float | None = None,
) -> Plan:
    """The Plan for team indices per (line, term): tiers recomputed in plain Python.

    Shared by both models so the same plan always reports the same numbers. `bound` (on the
    weighted objective's scale) defaults to the best bound the callback saw.
    """
    tiers = evaluate(problem, categories, rows)
    objective = float(sum(weights[k] * v for k, v in _tier_totals(tiers).items()))
    if status == "OPTIMAL":
        bound = objective
    else:
        bound = min(objective, bound if bound is not None else (callback.bound or 0.0))
    callback.final(objective, bound)
    lines = []
    for ln, row in enumerate(rows):
        rotations = {problem.terms[t].id: problem.teams[k].id for t, k in enumerate(row)}
        lines.append(PlanLine(line=ln + 1, rotations=rotations,
                              pinned=problem.kept_pins(ln + 1, rotations)))
    unfilled_map = unfilled_of(problem, [pl.rotations for pl in lines])
    penalties: dict[str, float | int] = dict(tiers)
    for tier, weight in weights.items():
        penalties[f"weight_{tier}"] = weight
    return Plan(
        status=status,
        lines=lines,
        objective=objective,
        best_bound=bound,
        gap=_gap(objective, bound),
        solve_seconds=time.monotonic() - started,
        unfilled=[
            Unfilled(team=tm, term=tr, missing=n) for (tm, tr), n in sorted(unfilled_map.items())
        ],
        changed_cells=changed_cells_of(problem, {pl.line: pl.rotations for pl in lines}),
        penalties=penalties,
        solutions=max(callback.solutions, 1),
    )


def _tier_totals(tiers: dict[str, int]) -> dict[str, int]:
    return {
        "unfilled": tiers["unfilled_positions"],
        "fairness": sum(max(0, v - 1) for k, v in tiers.items() if k.startswith("fairness_")),
        "changed_cells": tiers["changed_cells_beyond_pins"],
    }


def _rows_from(lm: LineModel, solver: cp_model.CpSolver) -> list[list[int]]:
    rows = [[-1] * len(lm.problem.terms) for _ in range(lm.n_lines)]
    for (line, t, k), v in lm.x.items():
        if solver.boolean_value(v):
            rows[line][t] = k
    return rows


def evaluate(problem: Problem, categories: list[str], rows: list[list[int]]) -> dict[str, int]:
    """Objective tiers of a plan given as team index per (line, term), in plain Python."""
    out: dict[str, int] = {"unfilled_positions": heuristic_unfilled(problem, rows)}
    if categories:
        for name in categories:
            pred = FAIRNESS_CATEGORIES[name]
            assert callable(pred)
            counts = [sum(1 for k in row if pred(problem.teams[k])) for row in rows]
            out[f"fairness_{name}_spread"] = max(counts) - min(counts)
    changed = 0
    if problem.previous_plan is not None and problem.options.stability != "off":
        team_index = {t.id: k for k, t in enumerate(problem.teams)}
        term_index = {t.id: i for i, t in enumerate(problem.terms)}
        for p in problem.previous_plan.lines:
            for term_id, team_id in p.rotations.items():
                if problem.options.keep_pinned and term_id in p.pinned:
                    continue
                if rows[p.line - 1][term_index[term_id]] != team_index[team_id]:
                    changed += 1
    out["changed_cells_beyond_pins"] = changed
    return out
