"""Tight instances (issue 12): a planted plan, every used cell's min = its planted count."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from solver.cli import register
from solver.generate import generate, generate_planted
from solver.problem import Plan, PlanLine, Problem
from solver.validate import validate_plan

CASES = [
    (30, 5, 30, ["VIC_PGY1", "MAX_ONE_RURAL"]),
    (24, 4, 28, ["VIC_PGY2", "NO_NIGHTS", "NO_CONSECUTIVE_SERVICE"]),
    (20, 5, 30, ["AMC_PGY1", "LEGACY_INTERN"]),
]


@pytest.mark.parametrize(("lines", "terms", "teams", "rule_sets"), CASES)
def test_planted_plan_is_valid_and_tight(
    lines: int, terms: int, teams: int, rule_sets: list[str]
) -> None:
    problem, planted = generate_planted(lines=lines, terms=terms, teams=teams,
                                        rule_sets=rule_sets, seed=5, tight=True)
    Problem.model_validate(problem.model_dump())  # a valid problem, round trip included
    plan = Plan(status="FEASIBLE",
                lines=[PlanLine(line=i + 1, rotations=r) for i, r in enumerate(planted)])
    assert validate_plan(problem, plan) == []
    counts = Counter((team, term) for r in planted for term, team in r.items())
    demand = problem.demand_map()
    for (team, term), c in counts.items():
        d = demand[team, term]
        assert d.min == c and d.max in (c, c + 1)
    # Every term's minimums add up to the number of lines: zero shortfall is an exact cover.
    for term in problem.terms:
        assert sum(d.min for d in problem.demand if d.term == term.id) == lines
    # Unused cells keep optional rows only.
    assert all(d.min == 0 for d in problem.demand if (d.team, d.term) not in counts)


def test_tight_mode_is_multi_site_with_rural_and_nights_and_deterministic() -> None:
    a = generate(lines=60, terms=5, teams=40, rule_sets=["VIC_PGY1"], seed=9, tight=True)
    b = generate(lines=60, terms=5, teams=40, rule_sets=["VIC_PGY1"], seed=9, tight=True)
    assert a == b
    assert len({t.site for t in a.teams}) >= 3
    assert any(t.rural for t in a.teams) and any(t.has_tag("NIGHTS") for t in a.teams)
    c = generate(lines=60, terms=5, teams=40, rule_sets=["VIC_PGY1"], seed=10, tight=True)
    assert c != a
    # The default mode is unchanged by the new flags' existence: slack around the witness.
    d = generate(lines=60, terms=5, teams=40, rule_sets=["VIC_PGY1"], seed=9)
    assert sum(x.min for x in d.demand) < sum(x.min for x in a.demand)


def test_site_subspecialties_split_subspecialties_by_site() -> None:
    p = generate(lines=30, terms=5, teams=40, rule_sets=["VIC_PGY1"], seed=2, tight=True,
                 site_subspecialties=True)
    for team in p.teams:
        assert team.subspecialty.endswith(f"@ {team.site}")


def test_cli_generates_tight_instances(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    out = tmp_path / "tight.json"
    r = CliRunner().invoke(app, ["generate-instance", "--lines", "20", "--terms", "4", "--teams",
                                 "26", "--rule-set", "VIC_PGY2", "--seed", "3", "--tight",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "(tight)" in r.output
    problem = Problem.model_validate(json.loads(out.read_text()))
    for term in problem.terms:
        assert sum(d.min for d in problem.demand if d.term == term.id) == 20


def test_cli_solves_a_tight_instance_with_the_patterns_model(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    problem, plan = tmp_path / "tight.json", tmp_path / "plan.json"
    r = runner.invoke(app, ["generate-instance", "--lines", "30", "--terms", "5", "--teams",
                            "30", "--rule-set", "VIC_PGY1", "--seed", "4", "--tight",
                            "-o", str(problem)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["solve", str(problem), "-o", str(plan), "--model", "columns"])
    assert r.exit_code == 2 and "--model lines or --model patterns" in r.output
    r = runner.invoke(app, ["solve", str(problem), "-o", str(plan), "--model", "patterns",
                            "--deterministic", "--time-limit", "20"])
    assert r.exit_code == 0, r.output
    saved = Plan.model_validate_json(plan.read_text())
    assert saved.unfilled == [] and len(saved.lines) == 30
    assert validate_plan(Problem.model_validate_json(problem.read_text()), saved) == []
