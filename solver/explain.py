"""Why is a problem infeasible? A small conflicting set of rules and demands, in manager language.

The explanation model (`build(..., guarded=True)`) switches each rule family, each term's
capacity, each strict minimum and each term's pins on with its own guard literal. Solving with all
guards as assumptions, CP-SAT returns `sufficient_assumptions_for_infeasibility`; a deletion pass
then drops every guard that is not needed, so what remains is a minimal conflicting set (within
the time given to each check).
"""

from __future__ import annotations

import time

from loguru import logger
from ortools.sat.python import cp_model

from solver.model import GuardKey, OutOfTime, build
from solver.problem import LEAVE, NIGHTS, Problem
from solver.rules import LONG_TERM_WEEKS, SPECS, combine, owners, pct_cap, pct_floor

#: Time for the first core and for each deletion check.
CORE_SECONDS = 10.0
CHECK_SECONDS = 2.0
TOTAL_SECONDS = 30.0


def _solve_with(
    model: cp_model.CpModel, lits: list[cp_model.IntVar], seconds: float
) -> tuple[cp_model.CpSolverStatus, list[int]]:
    model.clear_assumptions()  # type: ignore[no-untyped-call]
    model.add_assumptions(lits)
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.num_workers = 1  # cores from assumptions need a single worker
    solver.parameters.catch_sigint_signal = False
    status = solver.solve(model)
    if status != cp_model.INFEASIBLE:
        return status, []
    return status, list(solver.sufficient_assumptions_for_infeasibility())


def minimal_core(problem: Problem, deadline: float | None = None) -> list[GuardKey] | None:
    """Guard keys of a (locally) minimal infeasible subset; None if none was found in time.

    `deadline` (time.monotonic() scale) bounds building and every check: the explanation is
    part of the solve's time limit (issue 12). Past it, the core found so far is returned
    (still conflicting, maybe not minimal).
    """
    started = time.monotonic()
    end = started + TOTAL_SECONDS if deadline is None else min(deadline, started + TOTAL_SECONDS)
    try:
        lm = build(problem, guarded=True, deadline=end)
    except OutOfTime:
        logger.warning("explanation: no time left to build the explanation model")
        return None
    keys = {lit.index: key for key, lit in lm.guards.items()}
    lits = list(lm.guards.values())
    left = end - time.monotonic()
    if left <= 0.01:
        return None
    status, core_idx = _solve_with(lm.model, lits, min(CORE_SECONDS, left))
    if status != cp_model.INFEASIBLE:
        logger.warning("explanation: no core found (status {})", status)
        return None
    core = [lm.guards[keys[i]] for i in core_idx if i in keys] or lits
    i = 0
    while i < len(core) and end - time.monotonic() > 0.01:
        trial = core[:i] + core[i + 1 :]
        st, sub = _solve_with(lm.model, trial, min(CHECK_SECONDS, end - time.monotonic()))
        if st == cp_model.INFEASIBLE:
            kept = set(sub) if sub else {v.index for v in trial}
            core = [v for v in trial if v.index in kept]
        else:
            i += 1
    return [keys[v.index] for v in core]


def _places(problem: Problem, pred: object, term_id: str | None = None) -> int:
    """Sum of `max` over demand rows of teams matching pred (optionally one term)."""
    assert callable(pred)
    return sum(
        d.max
        for d in problem.demand
        if (term_id is None or d.term == term_id) and pred(problem.team(d.team))
    )


def describe(problem: Problem, key: GuardKey) -> str:
    """One manager-language sentence for one guard key."""
    n = problem.n_job_lines
    total = problem.total_weeks
    spec = combine(problem.rule_sets)
    kind = key[0]

    def who(attr: str) -> str:
        return "/".join(owners(problem.rule_sets, attr)) or "the rules"

    if kind == "capacity":
        term = problem.term(key[1])
        places = sum(d.max for d in problem.demand if d.term == term.id)
        if places < n:
            return (f"{term.label}: {n} lines each need a team, but the teams' maxima add "
                    f"up to only {places} place(s).")
        return (f"{term.label}: each team takes at most its maximum number of lines "
                f"({places} places in total for {n} lines).")
    if kind == "minimum":
        team, term = problem.team(key[1]), problem.term(key[2])
        d = problem.demand_map()[team.id, term.id]
        return f"{term.label}: {team.label} must get at least {d.min} lines (strict minimum)."
    if kind == "pins":
        term = problem.term(key[1])
        return f"{term.label}: the pinned rotations of the previous plan must be kept."
    if kind == "no_repeat":
        return "A line may not take the same team twice."
    if kind == "subspecialty":
        cap = pct_cap(total, spec.max_subspecialty_pct or 0)
        return (f"{who('max_subspecialty_pct')} allows at most {spec.max_subspecialty_pct}% of the "
                f"{total}-week year ({cap} weeks) in one subspecialty.")
    if kind == "specialty":
        cap = pct_cap(total, spec.max_specialty_pct or 0)
        return (f"{who('max_specialty_pct')} allows at most {spec.max_specialty_pct}% of the "
                f"{total}-week year ({cap} weeks) in one specialty.")
    if kind == "service":
        cap = pct_cap(total, spec.max_service_pct or 0)
        return (f"{who('max_service_pct')} allows at most {spec.max_service_pct}% of the "
                f"{total}-week year ({cap} weeks) in service teams (relief, nights, leave cover).")
    if kind == "clinical":
        need = pct_floor(total, spec.min_clinical_pct or 0)
        places = _places(problem, lambda t: t.kind == "clinical")
        return (f"{who('min_clinical_pct')} needs at least {spec.min_clinical_pct}% of the year "
                f"({need} weeks) in clinical teams; clinical teams offer {places} place(s) in "
                f"total for {n} lines.")
    if kind == "non_clinical":
        return (f"{who('max_non_clinical_terms')} allows at most {spec.max_non_clinical_terms} "
                f"non-clinical term(s) per line.")
    if kind == "experience":
        e = key[1]
        places = _places(problem, lambda t: e in t.experiences)
        carriers = [c for c in problem.rule_sets if e in SPECS[c].experiences]
        return (f"{'/'.join(carriers)}: {n} lines each need a term with experience {e}, but teams "
                f"giving {e} offer only {places} place(s) across the whole year.")
    if kind == "long_terms":
        long_terms = [t for t in problem.terms if t.weeks >= LONG_TERM_WEEKS]
        return (f"{who('min_long_terms')} needs at least {spec.min_long_terms} terms of "
                f"≥{LONG_TERM_WEEKS} weeks not spent on leave ({LEAVE}); the year has "
                f"{len(long_terms)} such term(s).")
    if kind == "specialty_weeks":
        name = key[1]
        need = spec.min_specialty_weeks[name]
        places = _places(problem, lambda t: t.specialty.lower() == name)
        return (f"{who('min_specialty_weeks')}: {n} lines each need ≥{need} weeks of {name}, but "
                f"{name} teams offer only {places} place(s) across the whole year.")
    if kind == "nights":
        return f"{who('forbid_nights')}: no line may take a team tagged {NIGHTS}."
    if kind == "rural":
        return f"{who('max_rural_terms')}: at most {spec.max_rural_terms} rural term(s) per line."
    if kind == "consecutive_service":
        return f"{who('no_consecutive_service')}: no two service terms in a row."
    return "/".join(key)


def explain_infeasible(problem: Problem, deadline: float | None = None) -> list[str]:
    """Sentences naming a smallest conflicting set found; the first one summarises."""
    core = minimal_core(problem, deadline)
    if core is None:
        return ["No plan satisfies all rules and demands, and no smaller conflicting set could be "
                "isolated in time; try relaxing demand maxima or rule sets one at a time."]
    if not core:
        return ["No plan exists even with every rule relaxed (the problem shape itself is "
                "inconsistent)."]
    head = (f"No plan for {problem.n_job_lines} lines: these {len(core)} requirement(s) "
            f"cannot all hold together:")
    return [head, *(describe(problem, k) for k in core)]
