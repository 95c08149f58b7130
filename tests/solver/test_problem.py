"""Malformed problems are refused with clear pydantic errors; the rule-set catalogue is stable."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from solver import RULE_SETS, Problem
from solver.rules import SPECS, TERMS_REQUIRED
from tests.solver.helpers import problem_dict


def _refused(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        Problem.model_validate(data)
    return str(info.value)


def test_valid_problem_with_names_is_accepted() -> None:
    data = problem_dict()
    data["terms"][0]["name"] = "Term one"
    data["teams"][0]["name"] = "General Medicine A"
    p = Problem.model_validate(data)
    assert p.terms[0].label == "Term one"
    assert p.teams[0].label == "General Medicine A"
    assert p.teams[1].label == p.teams[1].id
    assert p.total_weeks == 50


@pytest.mark.parametrize(
    ("where", "mutate", "expected"),
    [
        ("top", lambda d: d.update(colour="red"), "Extra inputs are not permitted"),
        ("team", lambda d: d["teams"][0].update(colour="red"), "Extra inputs are not permitted"),
        ("options", lambda d: d["options"].update(turbo=True), "Extra inputs are not permitted"),
        ("rule set", lambda d: d.update(rule_sets=["NSW_PGY9"]), "unknown rule set 'NSW_PGY9'"),
        ("terms", lambda d: d["terms"].pop(), "VIC_PGY1 is for a 5-term year"),
        ("zero weeks", lambda d: d["terms"][0].update(weeks=0), "greater than 0"),
        ("negative weeks", lambda d: d["terms"][0].update(weeks=-3), "greater than 0"),
        ("unknown team", lambda d: d["demand"][0].update(team="NOPE"), "unknown team 'NOPE'"),
        ("unknown term", lambda d: d["demand"][0].update(term="T9"), "unknown term 'T9'"),
        ("min>max", lambda d: d["demand"][0].update(min=5, max=2), "min (5) is greater than max"),
        ("negative min", lambda d: d["demand"][0].update(min=-1), "greater than or equal to 0"),
        ("no lines", lambda d: d.update(n_job_lines=0), "greater than or equal to 1"),
        ("dup team", lambda d: d["teams"].append(dict(d["teams"][0])), "duplicate team id"),
        ("dup demand", lambda d: d["demand"].append(dict(d["demand"][0])), "duplicate demand"),
        ("bad kind", lambda d: d["teams"][0].update(kind="admin"), "clinical"),
        ("dup rule set", lambda d: d.update(rule_sets=["NO_NIGHTS", "NO_NIGHTS"]), "twice"),
    ],
)
def test_malformed_problems_are_refused(where: str, mutate: Any, expected: str) -> None:
    data = copy.deepcopy(problem_dict())
    mutate(data)
    assert expected in _refused(data), where


def test_vic_pgy2_needs_four_terms() -> None:
    msg = _refused(problem_dict(rule_sets=["VIC_PGY2"]))
    assert "VIC_PGY2 is for a 4-term year, but the problem has 5 term(s)" in msg


def test_previous_plan_is_checked() -> None:
    data = problem_dict()
    data["previous_plan"] = {"lines": [
        {"line": 9, "rotations": {"T1": "GMED"}},
        {"line": 1, "rotations": {"T1": "GHOST", "T7": "GMED"}},
    ]}
    msg = _refused(data)
    assert "line 9 is beyond n_job_lines" in msg
    assert "unknown team 'GHOST'" in msg
    assert "unknown term 'T7'" in msg
    data["previous_plan"] = {"lines": [{"line": 2, "rotations": {"T1": "GMED"}, "pinned": ["T2"]}]}
    assert "pinned term(s) ['T2'] have no rotation" in _refused(data)


def test_rule_set_catalogue_is_complete_and_consistent() -> None:
    assert set(RULE_SETS) == {
        "AMC_PGY1", "AMC_PGY2", "VIC_PGY1", "VIC_PGY2", "LEGACY_INTERN", "NO_NIGHTS",
        "MAX_ONE_RURAL", "NO_CONSECUTIVE_SERVICE",
    }
    assert set(SPECS) == set(RULE_SETS)
    assert all(isinstance(v, str) and v and "\n" not in v for v in RULE_SETS.values())
    assert TERMS_REQUIRED == {"VIC_PGY1": 5, "VIC_PGY2": 4}
    assert SPECS["VIC_PGY1"] == SPECS["AMC_PGY1"]
    assert SPECS["VIC_PGY2"] == SPECS["AMC_PGY2"]


@pytest.mark.timeout(60)
def test_duplicate_ids_are_found_in_linear_time():
    """Issue 13: the duplicate-id check was quadratic (40,000 teams: over two minutes, while
    the listener's event loop stood still). 40,000 teams with one duplicate are refused by
    name well inside the timeout."""
    teams = [{"id": f"team{i}", "specialty": "medicine", "subspecialty": "general"}
             for i in range(40_000)]
    teams.append(dict(teams[123]))
    with pytest.raises(ValidationError, match=r"duplicate team id\(s\): \['team123'\]"):
        Problem.model_validate({"terms": [{"id": "T1", "weeks": 10}], "teams": teams,
                                "n_job_lines": 1})
