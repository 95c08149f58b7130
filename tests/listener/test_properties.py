"""Regression: junk input gets a readable validation error, never a TypeError.

Found by the property test tests/chaos/test_properties.py, when the listener still patched
load_problem's output in Python (`int(line)` on a previous-plan line number of None, `dict(team)`
on a team that is not an object). The run must end "invalid input: ...", not "internal error".
The database never produces such rows; a hand-written problem can.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from listener.executor import summarise_validation
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
        Problem.model_validate({**BASE, **junk})
    reason = summarise_validation(err.value)
    assert reason and "\n" not in reason
