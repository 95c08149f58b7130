"""Greedy randomised construction of a complete plan, used as a CP-SAT hint.

Why: CP-SAT only profits fully from *complete* hints, and on 125+ lines its own first solutions
leave many positions unfilled for seconds. Building lines one by one — each line drawn at
random, biased towards cells still below their minimum, respecting remaining capacity and every
per-line rule — gives a complete, usually shortfall-free plan in well under a second. Its
number of unfilled positions is an upper bound for the top objective tier, which lets the solve
skip the "unfilled only" phase when it is already zero.

The construction honours pins and, for stability, first tries to keep each previous line as it
was. It may fail (returns None); the solver then searches without a hint.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from solver.problem import LEAVE, NIGHTS, Problem
from solver.rules import LONG_TERM_WEEKS, combine, pct_cap, pct_floor


@dataclass(frozen=True)
class _TeamInfo:
    sub: str
    spec: str
    kind: str
    exps: frozenset[str]
    rural: bool
    nights: bool
    leave: bool


def construct(
    problem: Problem, *, seed: int = 0, tries: int = 300, partial: bool = False,
    deadline: float | None = None,
) -> list[list[int]] | None:
    """Team index per (line, term), or None when the greedy gets stuck.

    `partial=True` returns the lines built before it got stuck instead (the patterns model
    seeds its LP with them), without the repair pass. Past `deadline` (time.monotonic()
    scale) it stops as if stuck: measured, one construction of 1,000 lines took 8.7 s, and
    the time limit bounds every phase (issue 12).
    """
    rng = random.Random(seed)
    spec = combine(problem.rule_sets)
    total = problem.total_weeks
    weeks = [t.weeks for t in problem.terms]
    n_terms = len(weeks)
    info = [
        _TeamInfo(t.subspecialty.lower(), t.specialty.lower(), t.kind, frozenset(t.experiences),
                  t.rural, t.has_tag(NIGHTS), t.has_tag(LEAVE))
        for t in problem.teams
    ]
    team_index = {t.id: k for k, t in enumerate(problem.teams)}
    term_index = {t.id: i for i, t in enumerate(problem.terms)}
    remaining: dict[tuple[int, int], int] = {}
    deficit: dict[tuple[int, int], int] = {}
    mins: dict[tuple[int, int], int] = {}
    options: list[list[int]] = [[] for _ in range(n_terms)]
    for d in problem.demand:
        k, t = team_index[d.team], term_index[d.term]
        remaining[k, t] = d.max
        deficit[k, t] = d.min
        mins[k, t] = d.min
        if not (spec.forbid_nights and info[k].nights):
            options[t].append(k)
    sub_cap = pct_cap(total, spec.max_subspecialty_pct) if spec.max_subspecialty_pct else None
    spec_cap = pct_cap(total, spec.max_specialty_pct) if spec.max_specialty_pct else None
    svc_cap = pct_cap(total, spec.max_service_pct) if spec.max_service_pct else None
    clin_need = pct_floor(total, spec.min_clinical_pct) if spec.min_clinical_pct else 0
    long_terms = [t for t in range(n_terms) if weeks[t] >= LONG_TERM_WEEKS]

    def fits(line: dict[int, int], t: int, k: int) -> bool:
        """Can team k join the partial line in term t without breaking a cap?"""
        ti = info[k]
        if k in line.values() or remaining.get((k, t), 0) <= 0:
            return False
        chosen = [(tt, info[kk]) for tt, kk in line.items()] + [(t, ti)]
        if sub_cap is not None and sum(weeks[tt] for tt, x in chosen if x.sub == ti.sub) > sub_cap:
            return False
        if spec_cap is not None and (
            sum(weeks[tt] for tt, x in chosen if x.spec == ti.spec) > spec_cap
        ):
            return False
        if ti.kind == "service":
            if svc_cap is not None and (
                sum(weeks[tt] for tt, x in chosen if x.kind == "service") > svc_cap
            ):
                return False
            if spec.no_consecutive_service and any(
                info[line[nb]].kind == "service" for nb in (t - 1, t + 1) if nb in line
            ):
                return False
        if ti.kind == "non_clinical" and spec.max_non_clinical_terms is not None and (
            sum(1 for _, x in chosen if x.kind == "non_clinical") > spec.max_non_clinical_terms
        ):
            return False
        if ti.rural and spec.max_rural_terms is not None and (
            sum(1 for _, x in chosen if x.rural) > spec.max_rural_terms
        ):
            return False
        # Enough clinical weeks must remain reachable.
        clin = sum(weeks[tt] for tt, x in chosen if x.kind == "clinical")
        open_weeks = sum(weeks[tt] for tt in range(n_terms) if tt not in line and tt != t)
        return clin + open_weeks >= clin_need

    def complete(line: dict[int, int]) -> bool:
        teams = [info[k] for k in line.values()]
        for e in spec.experiences:
            if not any(e in x.exps for x in teams):
                return False
        if spec.min_long_terms is not None and (
            sum(1 for t in long_terms if not info[line[t]].leave) < spec.min_long_terms
        ):
            return False
        for name, need in spec.min_specialty_weeks.items():
            if sum(weeks[t] for t, k in line.items() if info[k].spec == name) < need:
                return False
        return sum(weeks[t] for t, k in line.items() if info[k].kind == "clinical") >= clin_need

    def commit(line: dict[int, int]) -> None:
        for t, k in line.items():
            remaining[k, t] -= 1
            if deficit.get((k, t), 0) > 0:
                deficit[k, t] -= 1

    prev = {}
    if problem.previous_plan is not None:
        prev = {p.line - 1: p for p in problem.previous_plan.lines}
    keep = problem.options.keep_pinned
    plan: list[list[int] | None] = [None] * problem.n_job_lines
    # Lines with pins or history first: they are the most constrained.
    order = sorted(range(problem.n_job_lines), key=lambda ln: (ln not in prev, ln))
    for ln in order:
        if deadline is not None and time.monotonic() > deadline:
            return [p for p in plan if p is not None] if partial else None
        pinned: dict[int, int] = {}
        if ln in prev and keep:
            for term_id in prev[ln].pinned:
                pinned[term_index[term_id]] = team_index[prev[ln].rotations[term_id]]
        built: dict[int, int] | None = None
        if ln in prev and problem.options.stability != "off":
            old = {term_index[t]: team_index[k] for t, k in prev[ln].rotations.items()}
            if len(old) == n_terms:
                trial: dict[int, int] = {}
                ok = True
                for t in range(n_terms):
                    if not fits(trial, t, old[t]):
                        ok = False
                        break
                    trial[t] = old[t]
                if ok and complete(trial):
                    built = trial
        for _attempt in range(tries if built is None else 0):
            line = dict(pinned)
            if any(remaining.get((k, t), 0) <= 0 for t, k in line.items()):
                return None
            free = [t for t in range(n_terms) if t not in line]
            rng.shuffle(free)
            dead = False
            for i, t in enumerate(free):
                have = {e for k in line.values() for e in info[k].exps}
                missing = [e for e in spec.experiences if e not in have]
                left = len(free) - i
                cands = [k for k in options[t] if fits(line, t, k)]
                if not cands:
                    dead = True
                    break
                weights = []
                for k in cands:
                    w = 0.1 + 20.0 * deficit.get((k, t), 0)
                    gain = len(info[k].exps.intersection(missing))
                    if missing and left <= len(missing) + 1:
                        w *= 1 + 6 * gain
                    weights.append(w)
                line[t] = rng.choices(cands, weights)[0]
            if not dead and complete(line):
                built = line
                break
        if built is None:
            if partial:
                return [p for p in plan if p is not None]
            return None
        commit(built)
        plan[ln] = [built[t] for t in range(n_terms)]
    rows = [p for p in plan if p is not None]
    _repair(rows, mins, remaining, fits, complete, pinned_cells(problem))
    return rows


def pinned_cells(problem: Problem) -> set[tuple[int, int]]:
    """(line index, term index) cells a repair move may not touch."""
    if problem.previous_plan is None or not problem.options.keep_pinned:
        return set()
    term_index = {t.id: i for i, t in enumerate(problem.terms)}
    return {(p.line - 1, term_index[t]) for p in problem.previous_plan.lines for t in p.pinned}


def _repair(
    rows: list[list[int]],
    mins: dict[tuple[int, int], int],
    remaining: dict[tuple[int, int], int],
    fits: Callable[[dict[int, int], int, int], bool],
    complete: Callable[[dict[int, int]], bool],
    frozen: set[tuple[int, int]],
) -> None:
    """Single-cell moves from teams above their minimum to teams below it.

    A move takes a line off a team whose minimum stays met and puts it on a team still short in
    the same term, when the line stays valid. Cheap, and it usually closes the last few gaps the
    sequential construction leaves.
    """
    counts: dict[tuple[int, int], int] = {}
    for row in rows:
        for t, k in enumerate(row):
            counts[k, t] = counts.get((k, t), 0) + 1
    for (k, t), need in mins.items():
        for ln, row in enumerate(rows):
            if counts.get((k, t), 0) >= need:
                break
            old = row[t]
            if (ln, t) in frozen or old == k or counts[old, t] - 1 < mins.get((old, t), 0):
                continue
            line = {tt: kk for tt, kk in enumerate(row) if tt != t}
            if not fits(line, t, k):
                continue
            line[t] = k
            if not complete(line):
                continue
            row[t] = k
            remaining[k, t] -= 1
            remaining[old, t] += 1
            counts[old, t] -= 1
            counts[k, t] = counts.get((k, t), 0) + 1


def unfilled_of(problem: Problem, plan: list[list[int]]) -> int:
    """Positions below minimum in a constructed plan."""
    team_index = {t.id: k for k, t in enumerate(problem.teams)}
    term_index = {t.id: i for i, t in enumerate(problem.terms)}
    counts: dict[tuple[int, int], int] = {}
    for row in plan:
        for t, k in enumerate(row):
            counts[k, t] = counts.get((k, t), 0) + 1
    return sum(
        max(0, d.min - counts.get((team_index[d.team], term_index[d.term]), 0))
        for d in problem.demand
    )
