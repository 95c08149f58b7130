"""Regression: `adapt_problem` must leave junk to the strict model instead of crashing on it.

Found by the property test tests/chaos/test_properties.py: `int(line)` on a previous-plan line
number of None, and `dict(team)` on a team that is not an object, raised TypeError/ValueError
before validation, so the run would have ended "internal error: TypeError ..." rather than
"invalid input: ...". The database never produces such rows; a hand-written problem can.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from listener.worker import adapt_problem, summarise_validation
from solver import Problem
from solver.generate import generate

BASE = generate(lines=6, terms=5, teams=8, rule_sets=["VIC_PGY1"], seed=3).model_dump(
    mode="json")


@pytest.mark.parametrize("junk", [
    {"previous_plan": {"lines": [{"line": None, "rotations": None, "pinned": None}]}},
    {"previous_plan": {"lines": [{"line": "x"}]}},
    {"previous_plan": {"lines": "not a list"}},
    {"teams": [None]},
    {"teams": "0"},
    {"teams": None},
])
def test_junk_gives_a_readable_validation_error(junk: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as err:
        Problem.model_validate(adapt_problem({**BASE, **junk}))
    reason = summarise_validation(err.value)
    assert reason and "\n" not in reason


def test_lines_beyond_n_are_still_dropped() -> None:
    prev = {"lines": [{"line": i, "rotations": {}, "pinned": []} for i in (1, 7, 9)]}
    out = adapt_problem({**BASE, "previous_plan": prev})
    assert [ln["line"] for ln in out["previous_plan"]["lines"]] == [1]
