"""Issue 12: a solve returns its best plan within the limit plus 2 s, at every size.

500 tight lines are large enough that, without a deadline passed down, building the line
model (~40 s at 1,000 lines), one greedy construction (~9 s at 1,000) or the patterns model's
seeding overrun a 1.5 s limit by far (measured; bench/limit_bench.py has the figures at
250/1,000/2,000 lines).
"""

from __future__ import annotations

import time

import pytest

from solver.generate import generate
from solver.problem import Problem
from solver.search import solve
from solver.validate import validate_plan

LIMIT_S = 1.5


@pytest.fixture(scope="module")
def big() -> Problem:
    return generate(lines=500, terms=5, teams=167, rule_sets=["VIC_PGY1", "MAX_ONE_RURAL"],
                    seed=1, tight=True, time_limit_seconds=LIMIT_S)


@pytest.mark.parametrize("model", ["lines", "patterns"])
def test_limit_plus_two_seconds_with_a_plan_or_a_clear_answer(big: Problem, model: str) -> None:
    problem = big.model_copy(update={"options": big.options.model_copy(update={"model": model})})
    started = time.monotonic()
    plan = solve(problem, num_workers=1)
    wall = time.monotonic() - started
    assert wall <= LIMIT_S + 2.0, f"{model}: {wall:.2f}s for a {LIMIT_S}s limit"
    if plan.status in ("OPTIMAL", "FEASIBLE"):
        assert validate_plan(problem, plan) == []
    else:
        assert plan.status == "UNKNOWN"
        assert plan.explanation is not None
        assert "time limit" in plan.explanation[0]
        assert "time_limit_seconds" in plan.explanation[0]


def test_infeasible_explanation_inside_the_limit() -> None:
    """The explanation counts against the limit: a short limit still gets an answer in time."""
    problem = generate(lines=200, terms=5, teams=67, rule_sets=["VIC_PGY1", "MAX_ONE_RURAL"],
                       seed=2, tight=True, time_limit_seconds=LIMIT_S)
    # One line more than the maxima admit in every term: infeasible.
    problem = problem.model_copy(update={
        "n_job_lines": sum(d.max for d in problem.demand if d.term == problem.terms[0].id) + 1,
        "options": problem.options.model_copy(update={"strict_minimum": True})})
    started = time.monotonic()
    plan = solve(problem, num_workers=1)
    wall = time.monotonic() - started
    assert wall <= LIMIT_S + 2.0, f"{wall:.2f}s for a {LIMIT_S}s limit"
    assert plan.status in ("INFEASIBLE", "UNKNOWN")
    assert plan.explanation
