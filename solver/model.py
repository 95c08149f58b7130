"""The CP-SAT model: one small function per rule family.

Variables: `x[l, t, k]` is true when line `l` takes team `k` in term `t`. A variable exists only
when team `k` has a demand row in term `t` (a team without demand takes no line). Everything else
(shortfall, fairness spreads, changed cells) is derived from these Booleans.

The same builder serves two purposes:

* the optimisation model (`guarded=False`): every constraint is hard, the objective is set;
* the explanation model (`guarded=True`): each rule family, each term's capacity, each strict
  minimum and each term's pins is switched on by its own Boolean "guard" literal, which the
  caller passes as assumptions so CP-SAT can name a small infeasible subset.

Parameters, callbacks and the solve loop live in `solver.search`; checking a plan lives in
`solver.validate` and does not use this code.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from solver.problem import LEAVE, NIGHTS, Problem
from solver.rules import LONG_TERM_WEEKS, RuleSpec, combine, pct_cap, pct_floor

GuardKey = tuple[str, ...]
Lit = cp_model.IntVar


class OutOfTime(Exception):
    """Building passed its deadline (issue 12: the time limit bounds every phase).

    Building is plain Python and CP-SAT's time limit does not cover it: measured, the line
    model for 1,000 lines (1.6 M literals) took 40 s to build. Callers catch this and return
    the best plan they already have.
    """


def check_deadline(deadline: float | None) -> None:
    """Raise OutOfTime once `deadline` (time.monotonic() scale) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise OutOfTime


@dataclass
class LineModel:
    """The built model and the handles the solve loop and the explanation need."""

    problem: Problem
    spec: RuleSpec
    model: cp_model.CpModel
    #: (line, term index, team index) -> Boolean
    x: dict[tuple[int, int, int], Lit] = field(default_factory=dict)
    #: (team index, term index) -> shortfall below min (integer, 0 when strict)
    shortfall: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)
    #: (team index, term index) -> number of lines on that team in that term
    rowcount: dict[tuple[int, int], cp_model.IntVar] = field(default_factory=dict)
    #: name -> spread variable (max - min count per line) of a fairness category
    spreads: dict[str, cp_model.IntVar] = field(default_factory=dict)
    #: name -> max(0, spread - 1), the part of the spread the objective penalises
    excess: dict[str, cp_model.IntVar] = field(default_factory=dict)
    #: linear expression counting cells that differ from the previous plan (beyond pins)
    changed: cp_model.LinearExprT = 0
    #: upper bound of `changed` (number of previous cells that may change)
    changed_max: int = 0
    #: the full weighted objective (all tiers)
    objective: cp_model.LinearExprT = 0
    #: guard literal -> what it switches on (explanation model only)
    guards: dict[GuardKey, Lit] = field(default_factory=dict)
    guarded: bool = False
    #: objective tier weights actually used (documented in docs/solver.md)
    weights: dict[str, int] = field(default_factory=dict)
    #: infeasible-by-construction keys (e.g. a pin on a team without demand)
    impossible: list[GuardKey] = field(default_factory=list)

    #: term index -> team indices with a demand row in that term
    teams_by_term: list[list[int]] = field(default_factory=list)
    #: line -> [(term index, team index, literal)]
    by_line: dict[int, list[tuple[int, int, Lit]]] = field(default_factory=dict)
    #: team index -> how many terms of one line may take it (None: 1 each). The patterns
    #: model (`solver.patterns`) builds this model over *classes* of interchangeable teams,
    #: where a class of three teams may appear in up to three terms of a line.
    multiplicity: list[int] | None = None
    #: building stops with OutOfTime after this instant (None: no limit)
    deadline: float | None = None

    @property
    def n_lines(self) -> int:
        return self.problem.n_job_lines

    def lines(self) -> Iterator[int]:
        """The line indices, checking the deadline every few lines (per-line loops are where
        building spends its time)."""
        for line in range(self.n_lines):
            if line % 16 == 0:
                check_deadline(self.deadline)
            yield line

    # -- guards --------------------------------------------------------------------------
    def guard(self, *key: str) -> list[Lit]:
        """Enforcement literals for a constraint of family `key` (empty when not guarded)."""
        if not self.guarded:
            return []
        if key not in self.guards:
            self.guards[key] = self.model.new_bool_var("guard:" + "/".join(key))
        return [self.guards[key]]

    def add(self, ct: cp_model.Constraint, *key: str) -> None:
        lits = self.guard(*key)
        if lits:
            ct.only_enforce_if(lits)

    def forbid(self, *key: str) -> None:
        """Record something impossible: the model is infeasible unless the guard is off."""
        self.impossible.append(key)
        lits = self.guard(*key)
        if lits:
            self.model.add_bool_or([lits[0].Not()])
        else:
            self.model.add_bool_or([])



def _team_indices(problem: Problem, pred: object) -> list[int]:
    assert callable(pred)
    return [i for i, team in enumerate(problem.teams) if pred(team)]


def _weighted(m: LineModel, line: int, teams: Sequence[int]) -> cp_model.LinearExprT:
    weeks = [term.weeks for term in m.problem.terms]
    return sum(weeks[t] * v for t, v in _line_cells(m, line, teams))


def _line_cells(m: LineModel, line: int, teams: Sequence[int]) -> list[tuple[int, Lit]]:
    wanted = set(teams)
    return [(t, v) for (t, k, v) in m.by_line[line] if k in wanted]


def _weeks_cap(m: LineModel, line: int, ks: Sequence[int], cap: int, *key: str) -> None:
    """`Σ weeks·x ≤ cap` over a line's cells in teams `ks`, as a cardinality when exact.

    With near-equal terms a weeks cap is really "at most r terms" (e.g. 25 % of 52 weeks with
    10-11-week terms is one term). A cardinality (`at_most_one` for r = 1) propagates and
    linearises far better than the weighted sum, so use it whenever it is equivalent: any r
    distinct terms fit under the cap and no r + 1 do. Cells longer than the cap are fixed off.
    """
    weeks = [term.weeks for term in m.problem.terms]
    cells = _line_cells(m, line, ks)
    for t, v in cells:
        if weeks[t] > cap:
            m.add(m.model.add(v == 0), *key)
    cells = [(t, v) for t, v in cells if weeks[t] <= cap]
    if not cells:
        return
    term_weeks = sorted({t: weeks[t] for t, _ in cells}.values())
    r = 0
    while r < len(term_weeks) and sum(term_weeks[len(term_weeks) - r - 1 :]) <= cap:
        r += 1
    exact = r == len(term_weeks) or sum(term_weeks[: r + 1]) > cap
    vs = [v for _, v in cells]
    if exact:
        if r >= len(term_weeks):
            return  # never binding
        if r == 1:
            m.add(m.model.add_at_most_one(vs), *key)
        else:
            m.add(m.model.add(sum(vs) <= r), *key)
    else:
        m.add(m.model.add(sum(weeks[t] * v for t, v in cells) <= cap), *key)


# ---------------------------------------------------------------------------- rule families


def add_cells(m: LineModel) -> None:
    """One team per line per term; teams without demand in a term get no variable."""
    p = m.problem
    dm = p.demand_map()
    m.by_line = {line: [] for line in range(m.n_lines)}
    for t, term in enumerate(p.terms):
        teams = [k for k, team in enumerate(p.teams) if (team.id, term.id) in dm]
        m.teams_by_term.append(teams)
        for line in m.lines():
            for k in teams:
                v = m.model.new_bool_var(f"x[{line},{t},{k}]")
                m.x[line, t, k] = v
                m.by_line[line].append((t, k, v))
            # Structural, never relaxed: a line without a team in a term is not a line.
            # An empty term is reported through the capacity guard instead.
            if teams:
                m.model.add_exactly_one(m.x[line, t, k] for k in teams)
        if not teams:
            m.forbid("capacity", term.id)


def add_no_repeat(m: LineModel) -> None:
    """A line never takes the same team twice."""
    for line in m.lines():
        per_team: dict[int, list[Lit]] = {}
        for _t, k, v in m.by_line[line]:
            per_team.setdefault(k, []).append(v)
        for k, vs in per_team.items():
            cap = 1 if m.multiplicity is None else m.multiplicity[k]
            if len(vs) > cap:
                if cap == 1:
                    m.add(m.model.add_at_most_one(vs), "no_repeat")
                else:
                    m.add(m.model.add(sum(vs) <= cap), "no_repeat")


def add_capacity(m: LineModel) -> None:
    """Per (team, term): at most `max` lines; shortfall below `min` is soft unless strict."""
    p = m.problem
    team_index = {team.id: k for k, team in enumerate(p.teams)}
    term_index = {term.id: t for t, term in enumerate(p.terms)}
    strict = p.options.strict_minimum
    for d in p.demand:
        check_deadline(m.deadline)
        k, t = team_index[d.team], term_index[d.term]
        vs = [m.x[line, t, k] for line in range(m.n_lines)]
        # An explicit count variable per cell lets bounds propagate to the aggregates used
        # by the fairness tier (see add_fairness).
        count = m.model.new_int_var(0, m.n_lines, f"count[{k},{t}]")
        m.model.add(count == sum(vs))
        m.rowcount[k, t] = count
        m.add(m.model.add(sum(vs) <= d.max), "capacity", d.term)
        if d.min == 0:
            continue
        if strict:
            m.add(m.model.add(sum(vs) >= d.min), "minimum", d.team, d.term)
        else:
            short = m.model.new_int_var(0, d.min, f"short[{k},{t}]")
            m.model.add(sum(vs) + short >= d.min)
            m.model.add(count + short >= d.min)
            m.shortfall[k, t] = short


def add_subspecialty_cap(m: LineModel) -> None:
    """Weeks in one subspecialty ≤ pct % of the year."""
    pct = m.spec.max_subspecialty_pct
    if pct is None:
        return
    cap = pct_cap(m.problem.total_weeks, pct)
    groups: dict[str, list[int]] = {}
    for k, team in enumerate(m.problem.teams):
        groups.setdefault(team.subspecialty.lower(), []).append(k)
    for line in m.lines():
        for ks in groups.values():
            _weeks_cap(m, line, ks, cap, "subspecialty")


def add_specialty_cap(m: LineModel) -> None:
    """Weeks in one specialty (all its subspecialties) ≤ pct % of the year."""
    pct = m.spec.max_specialty_pct
    if pct is None:
        return
    cap = pct_cap(m.problem.total_weeks, pct)
    groups: dict[str, list[int]] = {}
    for k, team in enumerate(m.problem.teams):
        groups.setdefault(team.specialty.lower(), []).append(k)
    for line in m.lines():
        for ks in groups.values():
            _weeks_cap(m, line, ks, cap, "specialty")


def add_service_cap(m: LineModel) -> None:
    """Weeks in `service` teams (relief, nights, leave cover) ≤ pct % of the year."""
    pct = m.spec.max_service_pct
    if pct is None:
        return
    cap = pct_cap(m.problem.total_weeks, pct)
    ks = _team_indices(m.problem, lambda team: team.kind == "service")
    for line in m.lines():
        _weeks_cap(m, line, ks, cap, "service")


def add_clinical_min(m: LineModel) -> None:
    """Weeks embedded in `clinical` teams ≥ pct % of the year."""
    pct = m.spec.min_clinical_pct
    if pct is None:
        return
    need = pct_floor(m.problem.total_weeks, pct)
    ks = _team_indices(m.problem, lambda team: team.kind == "clinical")
    for line in m.lines():
        m.add(m.model.add(_weighted(m, line, ks) >= need), "clinical")


def add_non_clinical_cap(m: LineModel) -> None:
    """At most N terms in `non_clinical` teams."""
    cap = m.spec.max_non_clinical_terms
    if cap is None:
        return
    ks = _team_indices(m.problem, lambda team: team.kind == "non_clinical")
    for line in m.lines():
        vs = [v for _, v in _line_cells(m, line, ks)]
        if len(vs) > cap:
            m.add(m.model.add(sum(vs) <= cap), "non_clinical")


def add_experiences(m: LineModel) -> None:
    """Each required clinical experience is covered by at least one term of every line."""
    for e in m.spec.experiences:
        ks = _team_indices(m.problem, lambda team, e=e: e in team.experiences)
        for line in m.lines():
            vs = [v for _, v in _line_cells(m, line, ks)]
            m.add(m.model.add_bool_or(vs), "experience", e)


def add_long_terms(m: LineModel) -> None:
    """At least N terms of ≥ 10 weeks that are not spent on leave."""
    need = m.spec.min_long_terms
    if need is None:
        return
    long_terms = [t for t, term in enumerate(m.problem.terms) if term.weeks >= LONG_TERM_WEEKS]
    leave = set(_team_indices(m.problem, lambda team: team.has_tag(LEAVE)))
    for line in m.lines():
        on_leave = [v for t, v in _line_cells(m, line, list(leave)) if t in long_terms]
        m.add(m.model.add(len(long_terms) - sum(on_leave) >= need), "long_terms")


def add_specialty_minimums(m: LineModel) -> None:
    """Minimum weeks in named specialties (legacy intern core terms)."""
    for name, weeks in sorted(m.spec.min_specialty_weeks.items()):
        ks = _team_indices(m.problem, lambda team, n=name: team.specialty.lower() == n)
        for line in m.lines():
            m.add(m.model.add(_weighted(m, line, ks) >= weeks), "specialty_weeks", name)


def add_no_nights(m: LineModel) -> None:
    """No line takes a team tagged NIGHTS."""
    if not m.spec.forbid_nights:
        return
    ks = set(_team_indices(m.problem, lambda team: team.has_tag(NIGHTS)))
    for (_line, _t, k), v in m.x.items():
        if k in ks:
            m.add(m.model.add(v == 0), "nights")


def add_rural_cap(m: LineModel) -> None:
    """At most N terms at rural teams."""
    cap = m.spec.max_rural_terms
    if cap is None:
        return
    ks = _team_indices(m.problem, lambda team: team.rural)
    for line in m.lines():
        vs = [v for _, v in _line_cells(m, line, ks)]
        if len(vs) > cap:
            m.add(m.model.add(sum(vs) <= cap), "rural")


def add_no_consecutive_service(m: LineModel) -> None:
    """No two service terms in consecutive terms (term order as given)."""
    if not m.spec.no_consecutive_service:
        return
    ks = _team_indices(m.problem, lambda team: team.kind == "service")
    for line in m.lines():
        per_term: dict[int, list[Lit]] = {}
        for t, v in _line_cells(m, line, ks):
            per_term.setdefault(t, []).append(v)
        for t in range(len(m.problem.terms) - 1):
            vs = per_term.get(t, []) + per_term.get(t + 1, [])
            if len(vs) > 1:
                m.add(m.model.add(sum(vs) <= 1), "consecutive_service")


RULE_FAMILIES = (
    add_no_repeat,
    add_capacity,
    add_subspecialty_cap,
    add_specialty_cap,
    add_service_cap,
    add_clinical_min,
    add_non_clinical_cap,
    add_experiences,
    add_long_terms,
    add_specialty_minimums,
    add_no_nights,
    add_rural_cap,
    add_no_consecutive_service,
)


# ------------------------------------------------------------------ previous plan, symmetry


def _previous(problem: Problem) -> dict[int, tuple[dict[str, str], set[str]]]:
    """Line index -> (previous rotations, pinned term ids)."""
    if problem.previous_plan is None:
        return {}
    return {p.line - 1: (dict(p.rotations), set(p.pinned)) for p in problem.previous_plan.lines}


def add_pins_and_stability(m: LineModel) -> None:
    """Keep pinned cells (when asked); count other previous cells that change; hint them all."""
    p = m.problem
    team_index = {team.id: k for k, team in enumerate(p.teams)}
    changed: list[cp_model.LinearExprT] = []
    for line, (rotations, pinned) in _previous(p).items():
        for t, term in enumerate(p.terms):
            if term.id not in rotations:
                continue
            k = team_index[rotations[term.id]]
            v = m.x.get((line, t, k))
            if p.options.keep_pinned and term.id in pinned:
                if v is None:
                    m.forbid("pins", term.id)
                else:
                    m.add(m.model.add(v == 1), "pins", term.id)
                continue
            if v is not None:
                m.model.add_hint(v, True)
            if p.options.stability != "off":
                changed.append(1 - v if v is not None else 1)
    m.changed = sum(changed)
    m.changed_max = len(changed)


def interchangeable_groups(problem: Problem) -> list[list[int]]:
    """Lines that nothing tells apart (same pins and, when stability counts, same history).

    Only lines inside one group may be reordered, so symmetry breaking stays valid with pins
    and with a previous plan.
    """
    prev = _previous(problem)
    opts = problem.options
    groups: dict[object, list[int]] = {}
    for line in range(problem.n_job_lines):
        rotations, pinned = prev.get(line, ({}, set()))
        kept = tuple(sorted((t, rotations[t]) for t in pinned)) if opts.keep_pinned else ()
        history = tuple(sorted(rotations.items())) if opts.stability != "off" else ()
        groups.setdefault((kept, history), []).append(line)
    return [g for g in groups.values() if len(g) > 1]


def add_symmetry_breaking(m: LineModel) -> None:
    """Order interchangeable lines lexicographically by their team sequence.

    `lex`: each line gets a mixed-radix code (team position per term, first term most
    significant) over as many leading terms as fit in 60 bits; codes are non-decreasing inside a
    group. A prefix of the lexicographic order is still valid symmetry breaking.
    `first_term`: only the first term's team position is non-decreasing (weaker, cheaper).
    """
    mode = m.problem.options.symmetry
    if mode == "none":
        return
    n_terms = len(m.problem.terms)
    radices = [max(1, len(m.teams_by_term[t])) for t in range(n_terms)]
    prefix = 1
    if mode == "lex":
        prod = radices[0]
        while prefix < n_terms and prod * radices[prefix] < 2**60:
            prod *= radices[prefix]
            prefix += 1
    positions = [{k: i for i, k in enumerate(m.teams_by_term[t])} for t in range(n_terms)]

    def code(line: int) -> cp_model.LinearExprT:
        lits: list[Lit] = []
        coeffs: list[int] = []
        for t in range(prefix):
            scale = 1
            for r in radices[t + 1 : prefix]:
                scale *= r
            for k in m.teams_by_term[t]:
                if positions[t][k]:
                    lits.append(m.x[line, t, k])
                    coeffs.append(scale * positions[t][k])
        return cp_model.LinearExpr.weighted_sum(lits, coeffs)

    for group in interchangeable_groups(m.problem):
        for a, b in itertools.pairwise(group):
            m.model.add(code(a) <= code(b))


# ------------------------------------------------------------------------------ objective


FAIRNESS_CATEGORIES: dict[str, object] = {
    "service": lambda team: team.kind == "service",
    "nights": lambda team: team.has_tag(NIGHTS),
    "rural": lambda team: team.rural,
}


def add_fairness(m: LineModel) -> None:
    """Spread (max - min over lines) of the number of service, nights and rural terms.

    The objective counts the spread beyond 1 per category (`excess`): lines that differ by at
    most one such term are as fair as the totals allow.
    """
    if not m.problem.options.fairness or m.n_lines < 2:
        return
    n_terms = len(m.problem.terms)
    for name, pred in FAIRNESS_CATEGORIES.items():
        ks = _team_indices(m.problem, pred)
        if not ks:
            continue
        hi = m.model.new_int_var(0, n_terms, f"{name}_max")
        lo = m.model.new_int_var(0, n_terms, f"{name}_min")
        counts = []
        for line in m.lines():
            count = sum(v for _, v in _line_cells(m, line, ks))
            counts.append(count)
            m.model.add(hi >= count)
            m.model.add(lo <= count)
        # Redundant aggregate: lines are interchangeable, so the only thing that decides the
        # best spread is the category's total. n*lo <= total <= n*hi lets propagation prove
        # "spread >= 1" without enumerating line permutations.
        total = m.model.new_int_var(0, m.n_lines * n_terms, f"{name}_total")
        m.model.add(total == sum(counts))
        kset = set(ks)
        m.model.add(total == sum(c for (k, _t), c in m.rowcount.items() if k in kset))
        m.model.add(m.n_lines * hi >= total)
        m.model.add(m.n_lines * lo <= total)
        spread = m.model.new_int_var(0, n_terms, f"{name}_spread")
        m.model.add(spread == hi - lo)
        m.spreads[name] = spread
        # Only spread beyond 1 is unfair: whether 0 is reachable is mostly a matter of the
        # total dividing by the number of lines, and proving it is not costs a full search.
        excess = m.model.new_int_var(0, n_terms, f"{name}_excess")
        m.model.add(excess >= spread - 1)
        m.excess[name] = excess


def unfilled_expr(m: LineModel) -> cp_model.LinearExprT:
    return sum(m.shortfall.values())


def fairness_categories(problem: Problem) -> list[str]:
    """The fairness categories the objective counts (present in the problem, option on)."""
    if not problem.options.fairness or problem.n_job_lines < 2:
        return []
    out = []
    for name, pred in FAIRNESS_CATEGORIES.items():
        assert callable(pred)
        if any(pred(team) for team in problem.teams):
            out.append(name)
    return out


def tier_weights(problem: Problem, n_categories: int, change_max: int) -> dict[str, int]:
    """Weights that fold the lexicographic tiers into one sum (each dominates the next).

    unfilled positions  >  fairness spreads  >  changed cells   (stability "prefer"/"off")
    unfilled positions  >  changed cells     >  fairness spreads (stability "strict")
    """
    fair_max = n_categories * len(problem.terms)
    if problem.options.stability == "strict":
        w_fair = 1
        w_change = fair_max + 1
        w_unfilled = w_change * (change_max + 1)
    else:
        w_change = 1
        w_fair = change_max + 1
        w_unfilled = w_fair * (fair_max + 1)
    return {"unfilled": w_unfilled, "fairness": w_fair, "changed_cells": w_change}


def set_objective(m: LineModel) -> None:
    """Lexicographic tiers folded into one weighted sum (`tier_weights`)."""
    unfilled = unfilled_expr(m)
    fairness = sum(m.excess.values())
    m.weights = tier_weights(m.problem, len(m.excess), m.changed_max)
    w_unfilled, w_fair, w_change = (m.weights[k] for k in ("unfilled", "fairness",
                                                           "changed_cells"))
    m.objective = cp_model.LinearExpr.weighted_sum(
        [unfilled, fairness, m.changed], [w_unfilled, w_fair, w_change]
    )
    m.model.minimize(m.objective)


def build(
    problem: Problem, *, guarded: bool = False, multiplicity: list[int] | None = None,
    deadline: float | None = None,
) -> LineModel:
    """Build the model. `guarded=True` builds the explanation variant (no objective).

    `multiplicity` (team index -> how many terms of a line may take it) is for the patterns
    model's class problems; the default, one term per team, is the rule for real teams.
    Raises OutOfTime once `deadline` (time.monotonic() scale) has passed.
    """
    m = LineModel(problem=problem, spec=combine(problem.rule_sets), model=cp_model.CpModel())
    m.guarded = guarded
    m.multiplicity = multiplicity
    m.deadline = deadline
    add_cells(m)
    for family in RULE_FAMILIES:
        check_deadline(deadline)
        family(m)
    check_deadline(deadline)
    add_pins_and_stability(m)
    if not guarded:
        check_deadline(deadline)
        add_symmetry_breaking(m)
        add_fairness(m)
        set_objective(m)
    check_deadline(deadline)
    return m

