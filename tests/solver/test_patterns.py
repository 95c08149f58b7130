"""The patterns model (`options.model = "patterns"`, issue 12), cpsat-primer style.

One tiny feasible and one tiny infeasible case per rule family: the feasible plan must pass the
independent validator, the infeasible one must come back INFEASIBLE with an explanation, and
the line model must agree on both (so a wrong class encoding cannot hide). Then a property test
on random tight instances (planted plan, min = planted count): always valid, zero shortfall.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from solver import Plan, Problem, solve, validate_plan
from solver.generate import generate
from solver.patterns import make_classes, to_teams
from tests.solver.helpers import problem_dict, team_dicts


def world(
    per_term: list[list[str]], rule_sets: list[str], *, n: int = 1,
    weeks: list[int] | None = None, options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A problem whose term i offers exactly the teams in per_term[i] (min 0, max n)."""
    ids = sorted({k for ks in per_term for k in ks})
    weeks = weeks or [52 // len(per_term)] * len(per_term)
    terms = [{"id": f"T{i + 1}", "weeks": w, "name": f"Term {i + 1}"} for i, w in enumerate(weeks)]
    demand = [{"team": k, "term": f"T{i + 1}", "min": 0, "max": n}
              for i, ks in enumerate(per_term) for k in ks]
    return {"terms": terms, "teams": team_dicts(ids), "demand": demand, "n_job_lines": n,
            "rule_sets": rule_sets,
            "options": {"deterministic": True, "time_limit_seconds": 10, "model": "patterns",
                        **(options or {})}}


def everywhere(teams: list[str], n_terms: int = 5) -> list[list[str]]:
    return [list(teams)] * n_terms


FIVE_CLINICAL = ["GMED", "CARD", "GSUR", "EMED", "PSYC"]

# family -> (feasible world, infeasible world); each pair differs only where the rule bites.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "no_repeat": (world(everywhere(["GMED", "GMED-B", "CARD", "RESP", "GSUR"]), [], n=2),
                  world(everywhere(["GMED", "CARD"]), [])),
    "capacity": (world(everywhere(FIVE_CLINICAL), [], n=5),
                 world(everywhere(FIVE_CLINICAL), [], n=5)),
    "subspecialty": (world(everywhere(["GMED", "CARD", "EMED", "PSYC"], 4), ["AMC_PGY2"]),
                     world(everywhere(["GMED", "GMED-B", "CARD", "EMED"], 4), ["AMC_PGY2"])),
    "specialty": (world(everywhere(FIVE_CLINICAL), ["VIC_PGY1"]),
                  world(everywhere(["GMED", "CARD", "RESP", "GSUR", "EMED"]), ["VIC_PGY1"])),
    "service": (world(everywhere(["GMED", "CARD", "GSUR", "EMED", "RELIEF"]), ["VIC_PGY1"]),
                world(everywhere(["GMED", "CARD", "GSUR", "RELIEF", "NIGHTS"]), ["VIC_PGY1"])),
    "clinical": (world([["GMED"], ["GSUR"], ["RELIEF"], ["RSCH"], ["EMED"]], ["AMC_PGY1"]),
                 world([["GMED"], ["GSUR"], ["RELIEF"], ["RSCH"], ["MEDU"]], ["AMC_PGY1"])),
    "non_clinical": (world([["GMED"], ["EMED"], ["RSCH"], ["CARD"]], ["AMC_PGY2"]),
                     world([["GMED"], ["EMED"], ["RSCH"], ["MEDU"]], ["AMC_PGY2"])),
    "experiences": (world(everywhere(["GMED", "CARD", "EMED", "PSYC", "GSUR"]), ["VIC_PGY1"]),
                    world(everywhere(["GMED", "CARD", "EMED", "PSYC", "ICU"]), ["VIC_PGY1"])),
    "long_terms": (world(everywhere(FIVE_CLINICAL), ["VIC_PGY1"], weeks=[10] * 5),
                   world(everywhere(FIVE_CLINICAL), ["VIC_PGY1"], weeks=[10, 10, 10, 9, 9])),
    "specialty_weeks": (world(everywhere(FIVE_CLINICAL), ["LEGACY_INTERN"]),
                        world(everywhere(["GMED", "CARD", "GSUR", "PSYC", "ICU"]),
                              ["LEGACY_INTERN"])),
    "nights": (world(everywhere(["GMED", "GSUR", "EMED", "PSYC", "RELIEF"]),
                     ["VIC_PGY1", "NO_NIGHTS"]),
               world(everywhere(["GMED", "GSUR", "EMED", "PSYC", "NIGHTS"]),
                     ["VIC_PGY1", "NO_NIGHTS"])),
    "rural": (world(everywhere(["RGP", "PSYC", "GMED", "GSUR", "EMED"]), ["MAX_ONE_RURAL"]),
              world(everywhere(["RGP", "RMED", "GMED", "GSUR", "EMED"]), ["MAX_ONE_RURAL"])),
    "consecutive_service": (
        world([["GMED"], ["RELIEF"], ["GSUR"], ["NIGHTS"], ["EMED"]], ["NO_CONSECUTIVE_SERVICE"]),
        world([["GMED"], ["RELIEF"], ["NIGHTS"], ["GSUR"], ["EMED"]],
              ["NO_CONSECUTIVE_SERVICE"])),
    "strict_minimum": (
        world(everywhere(FIVE_CLINICAL), [], n=4, options={"strict_minimum": True}),
        world(everywhere(FIVE_CLINICAL), [], n=4, options={"strict_minimum": True})),
}
# Capacity: term 5's maxima add up to 4 places for 5 lines.
for d in CASES["capacity"][1]["demand"]:
    if d["term"] == "T5":
        d["max"] = 0 if d["team"] == "PSYC" else 1
# Strict minima: three teams each want 2 of the 4 lines in T1 (feasible: two of them).
for d in CASES["strict_minimum"][0]["demand"]:
    if d["term"] == "T1" and d["team"] in ("GMED", "GSUR"):
        d["min"] = 2
for d in CASES["strict_minimum"][1]["demand"]:
    if d["term"] == "T1" and d["team"] in ("GMED", "GSUR", "EMED"):
        d["min"] = 2


def _both(data: dict[str, Any]) -> tuple[Problem, Plan, Plan]:
    p = Problem.model_validate(data)
    # The baseline without its greedy construction: on an infeasible problem the greedy
    # retries every line before giving up (~1 s), and CP-SAT alone decides these at once.
    lines = p.model_copy(update={"options": p.options.model_copy(
        update={"model": "lines", "construction": "off"})})
    return p, solve(p), solve(lines)


@pytest.mark.parametrize("family", sorted(CASES))
def test_feasible_case(family: str) -> None:
    p, plan, baseline = _both(CASES[family][0])
    assert plan.status == "OPTIMAL", plan.explanation
    assert validate_plan(p, plan) == []
    assert len(plan.lines) == p.n_job_lines and plan.unfilled == []
    assert baseline.status == "OPTIMAL"
    assert plan.penalties["unfilled_positions"] == baseline.penalties["unfilled_positions"]


@pytest.mark.parametrize("family", sorted(CASES))
def test_infeasible_case(family: str) -> None:
    _p, plan, baseline = _both(CASES[family][1])
    assert plan.status == "INFEASIBLE" and plan.lines == []
    assert plan.explanation and plan.explanation[0].startswith("No plan for")
    assert baseline.status == "INFEASIBLE"


def test_unknown_model_is_refused_clearly() -> None:
    data = problem_dict(n=2, options={"model": "columns"})
    with pytest.raises(ValidationError) as exc:
        Problem.model_validate(data)
    assert "'lines' or 'patterns'" in str(exc.value)


def test_classes_merge_interchangeable_teams_and_split_back() -> None:
    p = Problem.model_validate(CASES["no_repeat"][0])
    cls = make_classes(p)
    assert len(cls.members) == 4  # GMED and GMED-B share every rule attribute
    gmed = next(c for c, m in enumerate(cls.members) if len(m) == 2)
    other = [c for c in range(4) if c != gmed]
    # Both lines take the GMED class twice: the split must give each line two distinct teams.
    rows = [[gmed, gmed, other[0], other[1], other[2]], [other[2], other[1], gmed, gmed,
                                                         other[0]]]
    teams = to_teams(cls, rows)
    assert teams is not None
    for row in teams:
        assert len(set(row)) == len(row)


def test_pins_fall_back_to_the_line_model_and_are_kept() -> None:
    data = problem_dict(n=4, options={"model": "patterns"})
    data["previous_plan"] = {"lines": [{"line": 2, "rotations": {"T1": "EMED"},
                                        "pinned": ["T1"]}]}
    p = Problem.model_validate(data)
    plan = solve(p)
    assert validate_plan(p, plan) == []
    assert plan.lines[1].rotations["T1"] == "EMED" and plan.lines[1].pinned == ["T1"]


RULE_COMBOS = [
    (5, ["VIC_PGY1", "MAX_ONE_RURAL"]),
    (4, ["VIC_PGY2", "NO_NIGHTS", "NO_CONSECUTIVE_SERVICE"]),
    (5, ["AMC_PGY1", "NO_NIGHTS"]),
    (4, ["AMC_PGY2", "MAX_ONE_RURAL"]),
]


@settings(max_examples=5, deadline=None, derandomize=True,
          phases=[Phase.explicit, Phase.generate])  # no shrinking: each example is a solve
@given(
    combo=st.sampled_from(RULE_COMBOS),
    lines=st.integers(min_value=20, max_value=250),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_random_tight_instances_come_back_valid_with_zero_shortfall(
    combo: tuple[int, list[str]], lines: int, seed: int
) -> None:
    """Deterministic mode (one CP-SAT worker). Subspecialties distinct per site are left to
    the benchmark: with one worker the integer step can miss an exact cover there (measured:
    250 lines, AMC_PGY1 + NO_NIGHTS, 4 unfilled after 30 s; two workers: 0 in 13 s)."""
    terms, rule_sets = combo
    p = generate(lines=lines, terms=terms, teams=max(30, lines // 3), rule_sets=rule_sets,
                 seed=seed, tight=True)
    p = p.model_copy(update={"options": p.options.model_copy(update={
        "model": "patterns", "deterministic": True, "time_limit_seconds": 30})})
    plan = solve(p)
    assert validate_plan(p, plan) == []
    assert plan.status == "OPTIMAL"
    assert plan.unfilled == [] and plan.penalties["unfilled_positions"] == 0
