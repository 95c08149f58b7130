"""Independent plan checker.

Deliberately separate from `solver.model`: it reads the rule sets one by one from
`solver.rules.SPECS` and recomputes weeks, counts and coverage with plain Python, so a bug in
the CP-SAT encoding cannot hide itself. Tests run it on every plan the solver returns; the CLI
exposes it as `planner validate`.
"""

from __future__ import annotations

import itertools
from collections import Counter

from solver.problem import LEAVE, NIGHTS, Plan, Problem, Team
from solver.rules import LONG_TERM_WEEKS, SPECS, RuleSpec, pct_cap, pct_floor


def _weeks_where(problem: Problem, rotations: dict[str, str], pred: object) -> int:
    assert callable(pred)
    total = 0
    for term in problem.terms:
        team_id = rotations.get(term.id)
        if team_id is not None and pred(problem.team(team_id)):
            total += term.weeks
    return total


def _terms_where(problem: Problem, rotations: dict[str, str], pred: object) -> list[str]:
    assert callable(pred)
    return [
        term.id
        for term in problem.terms
        if term.id in rotations and pred(problem.team(rotations[term.id]))
    ]


def check_spec(problem: Problem, code: str, spec: RuleSpec, rotations: dict[str, str]) -> list[str]:
    """Violations of one rule set by one line's rotations (messages without the line number)."""
    out: list[str] = []
    total = problem.total_weeks
    if spec.max_subspecialty_pct is not None:
        cap = pct_cap(total, spec.max_subspecialty_pct)
        subs = {problem.team(t).subspecialty.lower() for t in rotations.values()}
        for sub in sorted(subs):
            w = _weeks_where(problem, rotations, lambda team, s=sub: team.subspecialty.lower() == s)
            if w > cap:
                out.append(f"{code}: {w} weeks in subspecialty {sub!r} exceed "
                           f"{spec.max_subspecialty_pct}% of {total} weeks ({cap})")
    if spec.max_specialty_pct is not None:
        cap = pct_cap(total, spec.max_specialty_pct)
        specs = {problem.team(t).specialty.lower() for t in rotations.values()}
        for sp in sorted(specs):
            w = _weeks_where(problem, rotations, lambda team, s=sp: team.specialty.lower() == s)
            if w > cap:
                out.append(f"{code}: {w} weeks in specialty {sp!r} exceed "
                           f"{spec.max_specialty_pct}% of {total} weeks ({cap})")
    if spec.max_service_pct is not None:
        cap = pct_cap(total, spec.max_service_pct)
        w = _weeks_where(problem, rotations, lambda team: team.kind == "service")
        if w > cap:
            out.append(f"{code}: {w} service weeks exceed {spec.max_service_pct}% of {total} "
                       f"weeks ({cap})")
    if spec.min_clinical_pct is not None:
        need = pct_floor(total, spec.min_clinical_pct)
        w = _weeks_where(problem, rotations, lambda team: team.kind == "clinical")
        if w < need:
            out.append(f"{code}: only {w} clinical weeks, need {spec.min_clinical_pct}% of "
                       f"{total} weeks ({need})")
    if spec.max_non_clinical_terms is not None:
        n = len(_terms_where(problem, rotations, lambda team: team.kind == "non_clinical"))
        if n > spec.max_non_clinical_terms:
            out.append(f"{code}: {n} non-clinical terms, at most {spec.max_non_clinical_terms}")
    for e in spec.experiences:
        if not _terms_where(problem, rotations, lambda team, e=e: e in team.experiences):
            out.append(f"{code}: no term gives experience {e}")
    if spec.min_long_terms is not None:
        n = sum(
            1
            for term in problem.terms
            if term.weeks >= LONG_TERM_WEEKS
            and term.id in rotations
            and not problem.team(rotations[term.id]).has_tag(LEAVE)
        )
        if n < spec.min_long_terms:
            out.append(f"{code}: only {n} terms of ≥{LONG_TERM_WEEKS} weeks (not on leave), "
                       f"need {spec.min_long_terms}")
    for name, need in sorted(spec.min_specialty_weeks.items()):
        w = _weeks_where(problem, rotations, lambda team, n=name: team.specialty.lower() == n)
        if w < need:
            out.append(f"{code}: only {w} weeks of {name}, need {need}")
    if spec.forbid_nights:
        bad = _terms_where(problem, rotations, lambda team: team.has_tag(NIGHTS))
        if bad:
            out.append(f"{code}: nights team in term(s) {bad}")
    if spec.max_rural_terms is not None:
        rural = _terms_where(problem, rotations, lambda team: team.rural)
        if len(rural) > spec.max_rural_terms:
            out.append(f"{code}: {len(rural)} rural terms, at most {spec.max_rural_terms}")
    if spec.no_consecutive_service:
        ids = [t.id for t in problem.terms]
        for a, b in itertools.pairwise(ids):
            if a in rotations and b in rotations:
                ta: Team = problem.team(rotations[a])
                tb: Team = problem.team(rotations[b])
                if ta.kind == "service" and tb.kind == "service":
                    out.append(f"{code}: service terms {a} and {b} are consecutive")
    return out


def line_violations(problem: Problem, rotations: dict[str, str]) -> list[str]:
    """Everything wrong with one line on its own (shape, demand existence, repeats, rules)."""
    out: list[str] = []
    term_ids = {t.id for t in problem.terms}
    team_ids = {t.id for t in problem.teams}
    demand = problem.demand_map()
    missing = [t.id for t in problem.terms if t.id not in rotations]
    if missing:
        out.append(f"no team in term(s) {missing}")
    for term_id, team_id in rotations.items():
        if term_id not in term_ids:
            out.append(f"unknown term {term_id!r}")
        elif team_id not in team_ids:
            out.append(f"unknown team {team_id!r} in term {term_id}")
        elif (team_id, term_id) not in demand:
            out.append(f"team {team_id} has no demand in term {term_id}")
    if out:
        return out
    repeats = [team for team, n in Counter(rotations.values()).items() if n > 1]
    if repeats:
        out.append(f"takes team(s) {sorted(repeats)} more than once")
    for code in problem.rule_sets:
        out.extend(check_spec(problem, code, SPECS[code], rotations))
    return out


def unfilled_of(problem: Problem, lines: list[dict[str, str]]) -> dict[tuple[str, str], int]:
    """(team, term) -> positions missing below `min`."""
    counts = Counter((team, term) for rot in lines for term, team in rot.items())
    return {
        (d.team, d.term): d.min - counts[d.team, d.term]
        for d in problem.demand
        if counts[d.team, d.term] < d.min
    }


def changed_cells_of(problem: Problem, lines: dict[int, dict[str, str]]) -> int:
    """Cells that differ from the previous plan, pinned cells included."""
    if problem.previous_plan is None:
        return 0
    n = 0
    for prev in problem.previous_plan.lines:
        new = lines.get(prev.line, {})
        n += sum(1 for term, team in prev.rotations.items() if new.get(term) != team)
    return n


def validate_plan(problem: Problem, plan: Plan) -> list[str]:
    """All violations of `plan` against `problem` (empty list = valid).

    A plan without lines and with status INFEASIBLE / UNKNOWN / INVALID claims nothing, so it
    has nothing to violate.
    """
    if not plan.lines:
        if plan.status in ("OPTIMAL", "FEASIBLE"):
            return [f"status {plan.status} but the plan has no lines"]
        return []
    out: list[str] = []
    numbers = [pl.line for pl in plan.lines]
    if sorted(numbers) != list(range(1, problem.n_job_lines + 1)):
        out.append(f"lines must be numbered 1..{problem.n_job_lines} exactly once, got "
                   f"{len(numbers)} line(s)")
    by_number = {pl.line: pl.rotations for pl in plan.lines}
    for pl in plan.lines:
        out.extend(f"line {pl.line}: {v}" for v in line_violations(problem, pl.rotations))
    counts = Counter((team, term) for pl in plan.lines for term, team in pl.rotations.items())
    for d in problem.demand:
        n = counts[d.team, d.term]
        if n > d.max:
            out.append(f"team {d.team} in term {d.term}: {n} lines exceed max {d.max}")
        if problem.options.strict_minimum and n < d.min:
            out.append(f"team {d.team} in term {d.term}: {n} lines below strict min {d.min}")
    expected = unfilled_of(problem, [pl.rotations for pl in plan.lines])
    reported = {(u.team, u.term): u.missing for u in plan.unfilled}
    if expected != reported:
        out.append(f"reported unfilled positions {reported} differ from actual {expected}")
    if problem.previous_plan is not None and problem.options.keep_pinned:
        for prev in problem.previous_plan.lines:
            for term in prev.pinned:
                got = by_number.get(prev.line, {}).get(term)
                if got != prev.rotations[term]:
                    out.append(f"line {prev.line}: pinned {term}={prev.rotations[term]} "
                               f"not kept (got {got})")
    prev_lines = {p.line: p for p in problem.previous_plan.lines} if (
        problem.previous_plan is not None and problem.options.keep_pinned) else {}
    for pl in plan.lines:
        before = prev_lines.get(pl.line)
        kept = [] if before is None else sorted(
            t for t in before.pinned if pl.rotations.get(t) == before.rotations[t])
        if sorted(pl.pinned) != kept:
            out.append(f"line {pl.line}: carries pins {sorted(pl.pinned)}, "
                       f"but the kept pins are {kept}")
    changed = changed_cells_of(problem, by_number)
    if changed != plan.changed_cells:
        out.append(f"reported changed_cells {plan.changed_cells} differ from actual {changed}")
    return out
