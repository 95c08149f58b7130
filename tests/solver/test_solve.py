"""In-process solves: every plan the solver returns passes the independent validator."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from solver import Plan, Problem, Progress, solve, validate_plan
from tests.solver.helpers import problem_dict, small_generated


def _solve_valid(problem: Problem, **kw: Any) -> Plan:
    plan = solve(problem, **kw)
    assert validate_plan(problem, plan) == []
    return plan


@pytest.mark.parametrize(
    "rule_sets",
    [
        ["VIC_PGY1"],
        ["AMC_PGY1", "LEGACY_INTERN"],
        ["VIC_PGY1", "NO_NIGHTS", "MAX_ONE_RURAL", "NO_CONSECUTIVE_SERVICE"],
        ["VIC_PGY2", "NO_NIGHTS"],
        ["AMC_PGY2", "MAX_ONE_RURAL"],
    ],
)
@pytest.mark.parametrize("construction", ["full", "off"])
def test_generated_instances_solve_to_valid_optimal_plans(
    rule_sets: list[str], construction: str
) -> None:
    """"off" makes CP-SAT find the plan alone, so the model itself is checked too."""
    p = small_generated(rule_sets)
    p = p.model_copy(update={"options": p.options.model_copy(
        update={"construction": construction})})
    plan = _solve_valid(p)
    assert plan.status == "OPTIMAL"
    assert len(plan.lines) == p.n_job_lines
    assert [pl.line for pl in plan.lines] == list(range(1, p.n_job_lines + 1))
    assert plan.unfilled == []
    assert plan.gap == 0.0 and plan.objective == plan.best_bound
    assert plan.penalties["unfilled_positions"] == 0


@pytest.mark.parametrize("construction", ["full", "off"])
def test_tempting_rule_breaks_are_avoided(construction: str) -> None:
    """Demand that would love medicine-heavy lines; the rules forbid them."""
    teams = ["GMED", "GMED-B", "CARD", "RESP", "RMED", "GSUR", "ORTH", "EMED", "PSYC", "ICU",
             "RGP", "RELIEF", "NIGHTS"]
    data = problem_dict(n=6, teams=teams,
                        rule_sets=["VIC_PGY1", "MAX_ONE_RURAL", "NO_CONSECUTIVE_SERVICE"],
                        options={"construction": construction})
    for d in data["demand"]:
        if d["team"] in ("GMED", "GMED-B", "CARD", "RESP", "RMED", "RELIEF", "NIGHTS", "RGP"):
            d["min"] = 2
    p = Problem.model_validate(data)
    plan = _solve_valid(p)
    assert plan.status == "OPTIMAL"
    assert sum(u.missing for u in plan.unfilled) > 0  # the mins cannot all be met legally
    assert plan.penalties["unfilled_positions"] == sum(u.missing for u in plan.unfilled)


def test_no_nights_and_no_demand_cells_are_never_used() -> None:
    p = small_generated(["VIC_PGY2", "NO_NIGHTS"])
    plan = _solve_valid(p)
    nights = {t.id for t in p.teams if t.has_tag("NIGHTS")}
    assert nights and all(team not in nights for pl in plan.lines for team in pl.rotations.values())


def test_determinism() -> None:
    p = small_generated(["VIC_PGY1"], lines=14, seed=5)
    a, b = solve(p), solve(p)
    assert a.lines == b.lines
    assert a.objective == b.objective


def test_pins_are_kept() -> None:
    p = small_generated(["VIC_PGY1"])
    first = _solve_valid(p)
    # Pin line 3 to what line 1 had in T1 and T2 and line 1 to line 3's T1.
    l1, l3 = first.lines[0].rotations, first.lines[2].rotations
    prev = [{"line": 3, "rotations": {"T1": l1["T1"], "T2": l1["T2"]}, "pinned": ["T1", "T2"]},
            {"line": 1, "rotations": {"T1": l3["T1"]}, "pinned": ["T1"]}]
    data = p.model_dump()
    data["previous_plan"] = {"lines": prev}
    pinned = Problem.model_validate(data)
    plan = _solve_valid(pinned)
    assert plan.lines[2].rotations["T1"] == l1["T1"]
    assert plan.lines[2].rotations["T2"] == l1["T2"]
    assert plan.lines[0].rotations["T1"] == l3["T1"]
    # The plan carries the pins it kept, so the next replan (and commit_plan) keeps them too.
    assert [pl.pinned for pl in plan.lines[:3]] == [["T1"], [], ["T1", "T2"]]
    assert all(pl.pinned == [] for pl in plan.lines[3:])
    data["options"]["keep_pinned"] = False
    free = _solve_valid(Problem.model_validate(data))
    assert all(pl.pinned == [] for pl in free.lines), "pins off: nothing is carried"


def _replan(p: Problem, plan: Plan, stability: str) -> tuple[Problem, Plan]:
    """Take one line away from a used team in T2 and re-plan against the previous plan."""
    data = p.model_dump()
    used = plan.lines[0].rotations["T2"]
    count = sum(1 for pl in plan.lines if pl.rotations["T2"] == used)
    for d in data["demand"]:
        if d["team"] == used and d["term"] == "T2":
            d["max"] = count - 1
            d["min"] = min(d["min"], d["max"])
    data["previous_plan"] = {"lines": [{"line": pl.line, "rotations": pl.rotations}
                                       for pl in plan.lines]}
    data["options"]["stability"] = stability
    q = Problem.model_validate(data)
    return q, _solve_valid(q)


def test_stability_keeps_most_cells() -> None:
    p = small_generated(["VIC_PGY1"], lines=16)
    first = _solve_valid(p)
    cells = p.n_job_lines * len(p.terms)
    _, strict = _replan(p, first, "strict")
    assert 0 < strict.changed_cells <= 0.15 * cells
    _, prefer = _replan(p, first, "prefer")
    assert prefer.changed_cells >= strict.changed_cells
    assert prefer.penalties["changed_cells_beyond_pins"] == prefer.changed_cells
    # Fairness ranks above stability in "prefer", below in "strict".
    fair = [k for k in prefer.penalties if k.startswith("fairness_")]
    assert sum(prefer.penalties[k] for k in fair) <= sum(strict.penalties[k] for k in fair)


def test_progress_is_reported_and_throttled() -> None:
    seen: list[Progress] = []
    p = small_generated(["VIC_PGY1"], lines=14)
    plan = _solve_valid(p, on_progress=seen.append)
    assert seen, "no progress"
    assert seen[0].solutions >= 1 and seen[0].objective is not None
    assert seen[-1].objective == plan.objective
    assert all(s.time_limit_ms == 20_000 for s in seen)
    assert [s.elapsed_ms for s in seen] == sorted(s.elapsed_ms for s in seen)
    assert len(seen) <= 2 + plan.solve_seconds / 0.25 + 2


def test_stop_returns_best_plan_so_far() -> None:
    p = small_generated(["VIC_PGY1"], lines=120, teams=60)
    p = p.model_copy(update={"options": p.options.model_copy(
        update={"deterministic": False, "time_limit_seconds": 60})})
    stop = threading.Event()

    def on_progress(pr: Progress) -> None:
        if pr.solutions:
            stop.set()

    started = time.monotonic()
    plan = _solve_valid(p, on_progress=on_progress, stop=stop, num_workers=2)
    assert time.monotonic() - started < 20
    assert plan.status in ("FEASIBLE", "OPTIMAL")
    assert len(plan.lines) == 120


def test_stopped_before_start_is_unknown() -> None:
    stop = threading.Event()
    stop.set()
    plan = solve(small_generated(["VIC_PGY1"]), stop=stop)
    assert plan.status == "UNKNOWN" and plan.lines == []
