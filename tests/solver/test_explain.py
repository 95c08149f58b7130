"""Infeasible problems come back INFEASIBLE with a small conflict named in manager language."""

from __future__ import annotations

from solver import Problem, solve
from tests.solver.helpers import problem_dict


def _infeasible(data: dict[str, object]) -> list[str]:
    plan = solve(Problem.model_validate(data))
    assert plan.status == "INFEASIBLE"
    assert plan.lines == []
    assert plan.explanation
    return plan.explanation


def test_term_capacity_too_small() -> None:
    data = problem_dict(n=10, rule_sets=[])
    for d in data["demand"]:
        if d["term"] == "T3":
            d["max"] = 0
    data["demand"].append({"team": "ZZZ", "term": "T3", "min": 0, "max": 7})
    data["teams"].append({"id": "ZZZ", "specialty": "x", "subspecialty": "x", "name": "Ward Z"})
    text = _infeasible(data)
    assert text[0].startswith("No plan for 10 lines")
    assert "Term 3: 10 lines each need a team, but the teams' maxima add up to only 7 place(s)." \
        in text
    assert len(text) == 2  # the capacity of term 3 alone explains it


def test_experience_shortage_names_rule_set_and_numbers() -> None:
    data = problem_dict(n=6)
    for d in data["demand"]:
        if d["team"] in ("GSUR", "ORTH"):  # the only teams giving experience D
            d["max"] = 1 if d["term"] in ("T1", "T2") else 0
    text = _infeasible(data)
    assert (
        "VIC_PGY1: 6 lines each need a term with experience D, but teams giving D offer only "
        "4 place(s) across the whole year." in text
    ), text
    assert not any("Term" in t and "maxima" in t for t in text), text


def test_strict_minimum_conflict() -> None:
    data = problem_dict(n=4, rule_sets=[], options={"strict_minimum": True})
    for d in data["demand"]:
        if d["term"] == "T1" and d["team"] in ("GMED", "GSUR", "EMED"):
            d["min"] = 2
    text = _infeasible(data)
    mins = [t for t in text if "strict minimum" in t]
    assert len(mins) == 3, text
    assert all(t.startswith("Term Term 1:") or t.startswith("Term 1") or "Term 1" in t
               for t in mins)


def test_pin_on_a_team_without_demand() -> None:
    data = problem_dict(n=2, rule_sets=[])
    data["demand"] = [d for d in data["demand"] if not (d["team"] == "ICU" and d["term"] == "T2")]
    data["previous_plan"] = {"lines": [{"line": 1, "rotations": {"T2": "ICU"}, "pinned": ["T2"]}]}
    text = _infeasible(data)
    assert any("pinned rotations of the previous plan must be kept" in t for t in text)
    data["options"]["keep_pinned"] = False
    assert solve(Problem.model_validate(data)).status == "OPTIMAL"


def test_rules_conflict_with_each_other() -> None:
    """Only surgical teams left with experience D, but LEGACY needs surgery weeks too: fine;
    NO_NIGHTS with only nights offering experience C in a small world is not."""
    teams = ["GMED", "PSYC", "GSUR", "ORTH", "RESP", "NIGHTS", "RGP"]
    data = problem_dict(n=2, teams=teams, rule_sets=["VIC_PGY1", "NO_NIGHTS"])
    for t in data["teams"]:
        if t["id"] == "GSUR":
            t["experiences"] = ["D"]
    text = _infeasible(data)
    assert any("NO_NIGHTS" in t for t in text), text
    assert any("experience C" in t for t in text), text
