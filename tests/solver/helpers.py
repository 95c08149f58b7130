"""Small hand-made problems for the solver tests (fast deterministic one-worker solves)."""

from __future__ import annotations

from typing import Any

from solver.generate import generate
from solver.problem import Plan, PlanLine, Problem

# id: (specialty, subspecialty, kind, experiences, rural, tags)
TEAMS: dict[str, tuple[str, str, str, list[str], bool, list[str]]] = {
    "GMED": ("medicine", "general medicine", "clinical", ["A", "B"], False, []),
    "GMED-B": ("medicine", "general medicine", "clinical", ["A", "B"], False, []),
    "CARD": ("medicine", "cardiology", "clinical", ["B", "C"], False, []),
    "RESP": ("medicine", "respiratory", "clinical", ["B"], False, []),
    "GSUR": ("surgery", "general surgery", "clinical", ["C", "D"], False, []),
    "ORTH": ("surgery", "orthopaedics", "clinical", ["D"], False, []),
    "EMED": ("emergency", "emergency medicine", "clinical", ["A", "C"], False, []),
    "PSYC": ("psychiatry", "adult psychiatry", "clinical", ["A", "B"], False, []),
    "ICU": ("critical care", "intensive care", "clinical", ["C"], False, []),
    "RGP": ("general practice", "general practice", "clinical", ["A", "B"], True, []),
    "RMED": ("medicine", "rural medicine", "clinical", ["B"], True, []),
    "RELIEF": ("service", "relief", "service", [], False, ["RELIEF"]),
    "NIGHTS": ("service", "nights", "service", ["C"], False, ["NIGHTS"]),
    "LEAVE": ("service", "leave", "service", [], False, ["LEAVE"]),
    "RSCH": ("research", "research", "non_clinical", [], False, []),
    "MEDU": ("medical education", "medical education", "non_clinical", [], False, []),
}


def team_dicts(ids: list[str] | None = None) -> list[dict[str, Any]]:
    out = []
    for tid in ids or list(TEAMS):
        spec, sub, kind, exps, rural, tags = TEAMS[tid]
        out.append({"id": tid, "specialty": spec, "subspecialty": sub, "kind": kind,
                    "experiences": exps, "site": "MMC", "rural": rural, "tags": tags})
    return out


def problem_dict(
    *,
    weeks: list[int] | None = None,
    n: int = 4,
    rule_sets: list[str] | None = None,
    teams: list[str] | None = None,
    max_per_cell: int | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every team has demand min 0, max `max_per_cell` (default n) in every term."""
    weeks = weeks or [10, 10, 10, 10, 10]
    tdicts = team_dicts(teams)
    terms = [{"id": f"T{i + 1}", "weeks": w, "name": f"Term {i + 1}"} for i, w in enumerate(weeks)]
    demand = [{"team": t["id"], "term": tr["id"], "min": 0,
               "max": n if max_per_cell is None else max_per_cell}
              for t in tdicts for tr in terms]
    return {"terms": terms, "teams": tdicts, "demand": demand, "n_job_lines": n,
            "rule_sets": rule_sets if rule_sets is not None else ["VIC_PGY1"],
            "options": {"deterministic": True, "time_limit_seconds": 20, **(options or {})}}


def plan_of(problem: Problem, rows: list[list[str]], **fields: Any) -> Plan:
    """A FEASIBLE plan from team ids per line (terms in order)."""
    lines = [PlanLine(line=i + 1, rotations={t.id: team for t, team in zip(problem.terms, row,
                                                                           strict=True)})
             for i, row in enumerate(rows)]
    return Plan(status="FEASIBLE", lines=lines, **fields)


def small_generated(rule_sets: list[str], *, lines: int = 12, teams: int = 26,
                    seed: int = 3) -> Problem:
    terms = 4 if any(r in ("VIC_PGY2",) for r in rule_sets) else 5
    p = generate(lines=lines, terms=terms, teams=teams, rule_sets=rule_sets, seed=seed)
    return p.model_copy(update={"options": p.options.model_copy(
        update={"deterministic": True, "time_limit_seconds": 20})})
