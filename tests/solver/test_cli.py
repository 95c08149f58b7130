"""`planner solve|validate|generate-instance` through typer's runner."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from solver.cli import register

app = typer.Typer()
register(app)
runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_generate_solve_validate_round_trip(tmp_path: Path) -> None:
    problem = tmp_path / "p.json"
    plan = tmp_path / "plan.json"
    r = runner.invoke(app, ["generate-instance", "--lines", "12", "--terms", "4", "--teams", "26",
                            "--rule-set", "VIC_PGY2", "--rule-set", "NO_NIGHTS", "--seed", "2",
                            "-o", str(problem)])
    assert r.exit_code == 0, r.output
    assert "12 lines, 4 terms" in r.output
    r = runner.invoke(app, ["solve", str(problem), "-o", str(plan), "--time-limit", "20",
                            "--seed", "1", "--deterministic"])
    assert r.exit_code == 0, r.output
    saved = json.loads(plan.read_text())
    assert saved["status"] == "OPTIMAL" and len(saved["lines"]) == 12
    r = runner.invoke(app, ["validate", str(problem), str(plan)])
    assert r.exit_code == 0 and "plan is valid" in r.output
    # Break the plan: the validator lists what is wrong and exits 1.
    saved["lines"][0]["rotations"]["T1"] = saved["lines"][0]["rotations"]["T2"]
    plan.write_text(json.dumps(saved))
    r = runner.invoke(app, ["validate", str(problem), str(plan)])
    assert r.exit_code == 1
    assert "line 1: " in r.output and "violation(s)" in r.output


def test_invalid_problem_gives_invalid_plan(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"terms": [{"id": "T1", "weeks": -2}], "teams": [],
                               "n_job_lines": 3, "colour": "red"}))
    out = tmp_path / "plan.json"
    r = runner.invoke(app, ["solve", str(bad), "-o", str(out)])
    assert r.exit_code == 2
    plan = json.loads(out.read_text())
    assert plan["status"] == "INVALID"
    assert any("colour: Extra inputs are not permitted" in e for e in plan["explanation"])
    assert any("terms.0.weeks" in e for e in plan["explanation"])


def test_generator_refuses_wrong_term_count(tmp_path: Path) -> None:
    r = runner.invoke(app, ["generate-instance", "--lines", "5", "--terms", "4", "--teams", "20",
                            "--rule-set", "VIC_PGY1", "-o", str(tmp_path / "x.json")])
    assert r.exit_code == 2
    assert "needs 5 terms" in r.output


def test_examples_are_valid_problems() -> None:
    from solver import Problem

    files = sorted(EXAMPLES.glob("*.json"))
    assert files
    for f in files:
        Problem.model_validate_json(f.read_text())
