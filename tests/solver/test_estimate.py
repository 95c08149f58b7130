"""Issue 12: a request too large for the memory cap is refused before the solve starts."""

from __future__ import annotations

import asyncio
import time

import pytest

from solver.estimate import estimate_mb, memory_refusal
from solver.generate import generate
from solver.problem import Problem
from solver.process import RequestTooLarge, start_solve


@pytest.fixture(scope="module")
def issue_500() -> Problem:
    """The issue's 500 lines x 167 teams, which ran out of 2,048 MiB mid-solve."""
    p = generate(lines=500, terms=5, teams=167, rule_sets=["VIC_PGY1", "MAX_ONE_RURAL"],
                 seed=1, tight=True)
    return p.model_copy(update={"options": p.options.model_copy(update={"model": "lines"})})


def test_the_issues_out_of_memory_case_is_refused_with_what_to_change(issue_500: Problem) -> None:
    message = memory_refusal(issue_500, 2048)
    assert message is not None
    assert message.startswith("request too large for the solver's memory cap: 500 lines x 5 "
                              "terms x 167 teams need about ")
    assert "ask for at most" in message and 'options.model "patterns"' in message
    fit = int(message.split("ask for at most ")[1].split()[0])
    smaller = issue_500.model_copy(update={"n_job_lines": fit})
    assert 0 < fit < 500 and memory_refusal(smaller, 2048) is None
    assert memory_refusal(issue_500.model_copy(update={"n_job_lines": fit + 1}), 2048)


def test_the_patterns_model_fits_where_the_line_model_does_not(issue_500: Problem) -> None:
    patterns = issue_500.model_copy(update={"options": issue_500.options.model_copy(
        update={"model": "patterns"})})
    assert memory_refusal(patterns, 2048) is None
    assert estimate_mb(patterns) < estimate_mb(issue_500)


def test_start_solve_refuses_at_once_under_a_small_cap() -> None:
    problem = generate(lines=12, terms=5, teams=26, rule_sets=["VIC_PGY1"], seed=3)

    async def go() -> None:
        start_solve(problem, memory_limit_mb=200)

    started = time.monotonic()
    with pytest.raises(RequestTooLarge, match="ask for at most 0 job lines"):
        asyncio.run(go())
    assert time.monotonic() - started < 1.0, "refused before any child process"
