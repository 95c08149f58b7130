"""The independent validator rejects a plan breaking each rule, and accepts a compliant one."""

from __future__ import annotations

import pytest

from solver import Plan, Problem, validate_plan
from solver.problem import Unfilled
from tests.solver.helpers import plan_of, problem_dict

GOOD_PGY1 = ["GMED", "GSUR", "EMED", "PSYC", "ORTH"]


def _p(**kw: object) -> Problem:
    return Problem.model_validate(problem_dict(n=1, **kw))  # type: ignore[arg-type]


def test_compliant_line_is_accepted() -> None:
    p = _p()
    assert validate_plan(p, plan_of(p, [GOOD_PGY1])) == []


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (["GMED", "GMED-B", "GSUR", "EMED", "ORTH"], "in subspecialty 'general medicine' exceed"),
        (["GMED", "CARD", "RESP", "GSUR", "EMED"], "in specialty 'medicine' exceed 50%"),
        (["RELIEF", "NIGHTS", "GMED", "GSUR", "EMED"], "20 service weeks exceed 20%"),
        (["RELIEF", "RSCH", "MEDU", "GSUR", "EMED"], "only 20 clinical weeks"),
        (["GMED", "CARD", "EMED", "PSYC", "ICU"], "no term gives experience D"),
    ],
)
def test_vic_pgy1_rules(row: list[str], expected: str) -> None:
    p = _p()
    violations = validate_plan(p, plan_of(p, [row]))
    assert any(expected in v and "VIC_PGY1" in v for v in violations), violations


def test_long_terms_exclude_leave() -> None:
    p = _p(weeks=[10, 10, 10, 10, 9])
    violations = validate_plan(p, plan_of(p, [["LEAVE", "GMED", "GSUR", "EMED", "ORTH"]]))
    assert any("only 3 terms of ≥10 weeks" in v for v in violations), violations


def test_vic_pgy2_non_clinical_cap() -> None:
    p = _p(weeks=[13, 13, 13, 13], rule_sets=["VIC_PGY2"])
    bad = plan_of(p, [["RSCH", "MEDU", "GMED", "EMED"]])
    assert any("2 non-clinical terms, at most 1" in v for v in validate_plan(p, bad))
    ok = plan_of(p, [["RSCH", "CARD", "GMED", "EMED"]])
    assert validate_plan(p, ok) == []


@pytest.mark.parametrize(
    ("rule", "row", "expected"),
    [
        ("LEGACY_INTERN", ["GMED", "GSUR", "PSYC", "ORTH", "CARD"], "only 0 weeks of emergency"),
        ("NO_NIGHTS", ["NIGHTS", "GMED", "GSUR", "EMED", "ORTH"], "nights team in term(s) ['T1']"),
        ("MAX_ONE_RURAL", ["RGP", "RMED", "GSUR", "EMED", "ORTH"], "2 rural terms, at most 1"),
        ("NO_CONSECUTIVE_SERVICE", ["RELIEF", "NIGHTS", "GSUR", "EMED", "ORTH"],
         "service terms T1 and T2 are consecutive"),
    ],
)
def test_optional_rule_sets(rule: str, row: list[str], expected: str) -> None:
    p = _p(rule_sets=[rule])
    violations = validate_plan(p, plan_of(p, [row]))
    assert any(expected in v and rule in v for v in violations), violations
    assert validate_plan(p, plan_of(p, [GOOD_PGY1])) == []


def test_always_on_rules() -> None:
    data = problem_dict(n=2, max_per_cell=1)
    data["demand"] = [d for d in data["demand"] if not (d["team"] == "ICU" and d["term"] == "T5")]
    p = Problem.model_validate(data)
    twice = plan_of(p, [["GMED", "GSUR", "EMED", "PSYC", "GMED"], GOOD_PGY1])
    msgs = validate_plan(p, twice)
    assert any("takes team(s) ['GMED'] more than once" in v for v in msgs)
    assert any("team GMED in term T1: 2 lines exceed max 1" in v for v in msgs)
    no_demand = plan_of(p, [["GMED", "GSUR", "EMED", "PSYC", "ICU"], GOOD_PGY1])
    assert any("team ICU has no demand in term T5" in v for v in validate_plan(p, no_demand))
    short = plan_of(p, [GOOD_PGY1])
    assert any("numbered 1..2" in v for v in validate_plan(p, short))
    missing_term = Plan(status="FEASIBLE", lines=[*plan_of(p, [GOOD_PGY1]).lines])
    missing_term.lines[0].rotations.pop("T3")
    assert any("no team in term(s) ['T3']" in v for v in validate_plan(p, missing_term))


def test_unfilled_strict_minimum_pins_and_changed_cells() -> None:
    data = problem_dict(n=1)
    data["demand"][0]["min"] = 1  # GMED in T1
    data["previous_plan"] = {"lines": [{"line": 1, "rotations": {"T1": "GMED", "T2": "GSUR"},
                                        "pinned": ["T1"]}]}
    p = Problem.model_validate(data)
    row = ["CARD", "GSUR", "EMED", "PSYC", "ORTH"]
    msgs = validate_plan(p, plan_of(p, [row]))
    assert any("reported unfilled positions {} differ" in v for v in msgs)
    assert any("pinned T1=GMED not kept" in v for v in msgs)
    assert any("reported changed_cells 0 differ from actual 1" in v for v in msgs)
    honest = plan_of(p, [row], changed_cells=1,
                     unfilled=[Unfilled(team="GMED", term="T1", missing=1)])
    assert [v for v in validate_plan(p, honest) if "pinned" not in v] == []
    strict = Problem.model_validate({**data, "options": {**data["options"],
                                                         "strict_minimum": True}})
    assert any("below strict min 1" in v for v in validate_plan(strict, honest))


def test_plans_without_lines() -> None:
    p = _p()
    assert validate_plan(p, Plan(status="INFEASIBLE", explanation=["x"])) == []
    assert validate_plan(p, Plan(status="OPTIMAL")) == ["status OPTIMAL but the plan has no lines"]


def test_the_pins_a_plan_carries_must_be_the_kept_ones() -> None:
    data = problem_dict(n=1)
    data["previous_plan"] = {"lines": [{"line": 1, "rotations": {"T1": "GMED", "T2": "GSUR"},
                                        "pinned": ["T1"]}]}
    p = Problem.model_validate(data)
    row = ["GMED", "GSUR", "EMED", "PSYC", "ORTH"]
    silent = plan_of(p, [row], changed_cells=0)
    assert "line 1: carries pins [], but the kept pins are ['T1']" in validate_plan(p, silent)
    honest = silent.model_copy(update={"lines": [
        silent.lines[0].model_copy(update={"pinned": ["T1"]})]})
    assert not [v for v in validate_plan(p, honest) if "pins" in v]
    invented = silent.model_copy(update={"lines": [
        silent.lines[0].model_copy(update={"pinned": ["T1", "T2"]})]})
    assert any("carries pins ['T1', 'T2']" in v for v in validate_plan(p, invented))
