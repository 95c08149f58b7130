"""The patterns model (`options.model = "patterns"`): lines as counts of valid class patterns.

Why: job lines are interchangeable (doctors are matched to lines later), and so are teams with
the same rule attributes. The line model (`solver.model`) gives every line its own copy of every
variable, so memory and search grow with lines x terms x teams and the search permutes identical
lines. Here:

1. **Classes.** Teams whose rule attributes agree (specialty, subspecialty, kind, experiences,
   rural, the NIGHTS and LEAVE tags: everything a rule reads) form one class; a (class, term)
   cell's demand is the sum of its teams' minima and maxima. Tight generated instances collapse
   to ~25 classes at any size. Site and other tags are not part of the key: no rule reads them.
2. **LP master** (GLOP, `pywraplp`): one column per valid *pattern* (a class per term),
   `sum lambda = n`, `count <= max`, `count + short >= min`, minimise the shortfall. An
   "unplaced" column with a high cost keeps it feasible; if it stays in the optimum, no
   assignment of n lines fits the maxima (infeasible).
3. **Pricing**: the line model built for *one* line over the class problem (so every rule family
   is the same code) with the duals as objective: the best valid pattern for the current prices,
   every improving solution found on the way added as a column. When pricing proves no column
   improves, the LP value is a lower bound on unfilled positions (otherwise the Lagrangian bound
   `LP + n * min reduced cost` is used).
4. **Integer step**: round every column down, and let CP-SAT place the remaining lines (the line
   model over the class problem with the residual demand), hinted by the fractional columns. If
   that leaves positions unfilled that the bound says are avoidable, fewer lines are fixed and
   the step repeats (down to the full class model).
5. **Back to teams**: each (class, term) count is split over the class's teams (minima first,
   then up to each maximum) and lines take teams of their class, never one team twice.
6. **Fairness** (spread of service / nights / rural terms per line): swaps of one term's cells
   between two lines keep every count, so they are tried while they lower the spread and keep
   both lines valid.

Pins and a previous plan to keep tell lines apart; such problems are solved by the line model
(logged), see docs/solver.md. Measurements and design notes: docs/solver.md.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from loguru import logger
from ortools.linear_solver import pywraplp
from ortools.sat.python import cp_model

from solver.heuristic import construct
from solver.model import (
    FAIRNESS_CATEGORIES,
    LineModel,
    OutOfTime,
    build,
    fairness_categories,
    tier_weights,
    unfilled_expr,
)
from solver.problem import LEAVE, NIGHTS, Demand, Plan, Problem, Status, Team
from solver.rules import SPECS
from solver.search import (
    ProgressFn,
    _best_so_far,
    _Progress,
    _search,
    evaluate,
    explain_deadline,
    parameters,
    plan_from_rows,
)
from solver.validate import check_spec, line_violations

Pattern = tuple[int, ...]

#: Share of the time limit column generation may use; the dive may go on until DIVE_SHARE.
CG_SHARE = 0.4
DIVE_SHARE = 0.6
#: Greedy attempts per line when seeding the LP (the greedy skips what it cannot place).
SEED_TRIES = 8
#: Largest CP-SAT model (line x term x class literals) the integer step builds: building is
#: plain Python and not bounded by CP-SAT's time limit (a 1,000-line class model took 26 s).
MAX_STEP_LITERALS = 60_000
#: When CP-SAT misses the bound, the next attempt frees this many times more lines.
FREE_GROWTH = 3
#: Share of the time left for an integer attempt that is not the last.
STEP_SHARE = 0.25
#: The dive stops when this many lines are left for CP-SAT.
DIVE_FREE_LINES = 12
#: Improving patterns per pricing call whose one-term changes are tried as columns too.
NEIGHBOUR_SOURCES = 3
MAX_NEIGHBOURS = 40
#: Time for splitting one repeated class into teams.
SPLIT_SECONDS = 5.0
#: Scale of the duals in the CP-SAT pricing objective (integers only there).
PRICE_SCALE = 1_000_000


def class_key(team: Team) -> tuple[object, ...]:
    """What the rules read of a team; teams with equal keys are interchangeable."""
    return (team.specialty.lower(), team.subspecialty.lower(), team.kind,
            tuple(sorted(set(team.experiences))), team.rural, team.has_tag(NIGHTS),
            team.has_tag(LEAVE))


@dataclass
class Classes:
    """Teams grouped into classes, and the class-level demand."""

    problem: Problem
    #: class -> team indices (in problem order)
    members: list[list[int]]
    #: one representative team per class (id "class-<i>")
    reps: list[Team]
    #: (class, term index) -> (sum of min, sum of max) over the class's teams with a row
    cells: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)

    @property
    def multiplicity(self) -> list[int]:
        return [len(m) for m in self.members]

    def class_problem(
        self, n: int, used: Counter[tuple[int, int]] | None = None, *, minimums: bool = True
    ) -> Problem:
        """The problem over classes for `n` lines, demand reduced by cells already `used`."""
        used = used or Counter()
        demand = []
        for (c, t), (lo, hi) in sorted(self.cells.items()):
            u = used[c, t]
            demand.append(Demand(team=self.reps[c].id, term=self.problem.terms[t].id,
                                 min=max(0, lo - u) if minimums else 0, max=max(0, hi - u)))
        opts = self.problem.options.model_copy(update={
            "fairness": False, "construction": "off", "model": "lines",
            "strict_minimum": self.problem.options.strict_minimum and minimums})
        return Problem(terms=self.problem.terms, teams=self.reps, demand=demand, n_job_lines=n,
                       rule_sets=self.problem.rule_sets, options=opts)


def make_classes(problem: Problem) -> Classes:
    keys: dict[tuple[object, ...], int] = {}
    members: list[list[int]] = []
    for k, team in enumerate(problem.teams):
        key = class_key(team)
        if key not in keys:
            keys[key] = len(members)
            members.append([])
        members[keys[key]].append(k)
    reps = [problem.teams[m[0]].model_copy(update={
        "id": f"class-{c}", "name": f"{problem.teams[m[0]].subspecialty} ({len(m)} team(s))"})
        for c, m in enumerate(members)]
    cls = Classes(problem=problem, members=members, reps=reps)
    class_of = {problem.teams[k].id: c for c, m in enumerate(members) for k in m}
    tix = {t.id: i for i, t in enumerate(problem.terms)}
    for d in problem.demand:
        key = (class_of[d.team], tix[d.term])
        lo, hi = cls.cells.get(key, (0, 0))
        cls.cells[key] = (lo + d.min, hi + d.max)
    return cls


# ------------------------------------------------------------------------------ LP master


class Master:
    """The restricted master LP over the patterns generated so far (GLOP)."""

    def __init__(
        self, cells: dict[tuple[int, int], tuple[int, int]], n: int, n_terms: int
    ) -> None:
        self.n = n
        self.lp = pywraplp.Solver.CreateSolver("GLOP")
        # Bounds change between solves (the dive): dual simplex restarts from the last basis.
        self.lp.SetSolverSpecificParametersAsString("use_dual_simplex: true")
        inf = self.lp.infinity()
        self.big = float(n_terms + 1)
        self.objective = self.lp.Objective()
        self.convexity = self.lp.Constraint(n, n, "lines")
        self.unplaced = self.lp.NumVar(0, inf, "unplaced")
        self.convexity.SetCoefficient(self.unplaced, 1)
        self.objective.SetCoefficient(self.unplaced, self.big)
        self.max_rows: dict[tuple[int, int], pywraplp.Constraint] = {}
        self.min_rows: dict[tuple[int, int], pywraplp.Constraint] = {}
        self.shorts: dict[tuple[int, int], pywraplp.Variable] = {}
        for (c, t), (lo, hi) in sorted(cells.items()):
            self.max_rows[c, t] = self.lp.Constraint(-inf, hi, f"max[{c},{t}]")
            if lo > 0:
                row = self.lp.Constraint(lo, inf, f"min[{c},{t}]")
                short = self.lp.NumVar(0, lo, f"short[{c},{t}]")
                row.SetCoefficient(short, 1)
                self.objective.SetCoefficient(short, 1)
                self.min_rows[c, t] = row
                self.shorts[c, t] = short
        self.objective.SetMinimization()
        self.columns: list[Pattern] = []
        self.vars: list[pywraplp.Variable] = []
        self.seen: set[Pattern] = set()
        self.value = math.inf
        #: GLOP stops at this instant (time.monotonic() scale; None: no limit)
        self.deadline: float | None = None

    def add(self, pattern: Pattern) -> bool:
        if pattern in self.seen:
            return False
        self.seen.add(pattern)
        var = self.lp.NumVar(0, self.lp.infinity(), f"p{len(self.columns)}")
        self.convexity.SetCoefficient(var, 1)
        for t, c in enumerate(pattern):
            self.max_rows[c, t].SetCoefficient(var, 1)
            if (c, t) in self.min_rows:
                self.min_rows[c, t].SetCoefficient(var, 1)
        self.columns.append(pattern)
        self.vars.append(var)
        return True

    def solve(self) -> bool:
        """False when the lower bounds the dive set cannot hold together (without them the
        unplaced column always makes the LP feasible), or when the deadline cut GLOP short."""
        if self.deadline is not None:
            left_ms = int((self.deadline - time.monotonic()) * 1000)
            self.lp.SetTimeLimit(max(10, left_ms))
        status = self.lp.Solve()
        if status != pywraplp.Solver.OPTIMAL:
            self.value = math.inf
            return False
        self.value = self.objective.Value()
        return True

    def prices(self) -> tuple[float, dict[tuple[int, int], float]]:
        """Dual of the convexity row and per-cell price (a column's cost is 0, so its reduced
        cost is `-mu - sum of its cells' prices`)."""
        prices: dict[tuple[int, int], float] = {}
        for key, row in self.max_rows.items():
            prices[key] = row.dual_value() + (
                self.min_rows[key].dual_value() if key in self.min_rows else 0.0)
        return self.convexity.dual_value(), prices

    def unplaced_lines(self) -> float:
        return float(self.unplaced.solution_value())

    def fractional(self) -> list[tuple[Pattern, float]]:
        return [(p, v.solution_value()) for p, v in zip(self.columns, self.vars, strict=True)
                if v.solution_value() > 1e-9]


class Pricing:
    """Best valid pattern for given prices: the line model for one line over the classes.

    Each CP-SAT call (~0.1 s at 100 classes) yields only the few improving patterns it meets
    on its way to the optimum, so every one-term change of the best patterns that still has a
    negative reduced cost and passes the validator's per-line check is added too: many more
    columns per LP solve, far fewer iterations.
    """

    def __init__(self, cls: Classes, num_workers: int | None) -> None:
        self.cls = cls
        problem = cls.class_problem(1, minimums=False)
        self.problem = problem
        self.by_term = [[c for (c, t2), (_lo, hi) in sorted(cls.cells.items())
                         if t2 == t and hi > 0] for t in range(len(problem.terms))]
        self._valid: dict[Pattern, bool] = {}
        self.lm: LineModel = build(problem, multiplicity=cls.multiplicity)
        self.params = parameters(problem, 1)
        self.n_terms = len(problem.terms)

    def price(
        self, mu: float, prices: dict[tuple[int, int], float], seconds: float
    ) -> tuple[list[Pattern], float | None]:
        """Improving patterns (reduced cost < 0) and a proven lower bound on the reduced cost
        (None when the pricing did not finish)."""
        lm = self.lm
        terms = [(v, round(prices.get((c, t), 0.0) * PRICE_SCALE))
                 for (_line, t, c), v in lm.x.items()]
        lm.model.maximize(cp_model.LinearExpr.weighted_sum([v for v, _ in terms],
                                                           [w for _, w in terms]))
        found: list[Pattern] = []
        cells = list(lm.x.items())

        class Collect(cp_model.CpSolverSolutionCallback):
            def on_solution_callback(self) -> None:
                row = [-1] * len(lm.problem.terms)
                gain = 0.0
                for (_line, t, c), v in cells:
                    if self.boolean_value(v):
                        row[t] = c
                        gain += prices.get((c, t), 0.0)
                if -mu - gain < -1e-7:
                    found.append(tuple(row))

        solver = cp_model.CpSolver()
        solver.parameters.copy_from(self.params)
        solver.parameters.max_time_in_seconds = max(0.01, seconds)
        status = solver.solve(lm.model, Collect())
        found.extend(self.neighbours(found[-NEIGHBOUR_SOURCES:], mu, prices))
        if status == cp_model.OPTIMAL:
            return found, -mu - solver.best_objective_bound / PRICE_SCALE - 1e-6 * self.n_terms
        if status == cp_model.INFEASIBLE:
            return [], math.inf  # no valid line at all
        return found, None


    def valid(self, pattern: Pattern) -> bool:
        ok = self._valid.get(pattern)
        if ok is None:
            rotations = {term.id: self.problem.teams[c].id
                         for term, c in zip(self.problem.terms, pattern, strict=True)}
            counts = Counter(pattern)
            mult = self.cls.multiplicity
            ok = all(n <= mult[c] for c, n in counts.items()) and not _rule_violations(
                self.problem, rotations)
            self._valid[pattern] = ok
        return ok

    def neighbours(
        self, sources: list[Pattern], mu: float, prices: dict[tuple[int, int], float]
    ) -> list[Pattern]:
        """Valid one-term changes of `sources` with a negative reduced cost, best first (at
        most MAX_NEIGHBOURS: too many columns slow the LP more than they save)."""
        candidates: dict[Pattern, float] = {}
        for p in sources:
            gain = sum(prices.get((c, t), 0.0) for t, c in enumerate(p))
            for t, here in enumerate(p):
                for c in self.by_term[t]:
                    if c == here:
                        continue
                    g = gain - prices.get((here, t), 0.0) + prices.get((c, t), 0.0)
                    if -mu - g < -1e-7:
                        candidates[(*p[:t], c, *p[t + 1 :])] = g
        out: list[Pattern] = []
        for q in sorted(candidates, key=lambda q: -candidates[q]):
            if q not in sources and self.valid(q):
                out.append(q)
                if len(out) >= MAX_NEIGHBOURS:
                    break
        return out


def _rule_violations(problem: Problem, rotations: dict[str, str]) -> list[str]:
    """The rule sets' per-line checks (not the no-repeat check: classes may repeat)."""
    out: list[str] = []
    for code in problem.rule_sets:
        out.extend(check_spec(problem, code, SPECS[code], rotations))
    return out


# ------------------------------------------------------------------------------- teams


def to_teams(
    cls: Classes, class_rows: list[list[int]], deadline: float | None = None
) -> list[list[int]] | None:
    """Team index per (line, term): counts split minima first, no team twice on a line.

    A class that no line takes twice is split greedily (each team to its minimum, then up to
    its maximum); a class some line repeats is split by a small CP-SAT model, because the
    split must give that line distinct teams. None when no split exists (the caller then
    falls back to the line model).
    """
    problem = cls.problem
    dm = problem.demand_map()
    repeated = {c for row in class_rows for c, n in Counter(row).items() if n > 1}
    counts = Counter((c, t) for row in class_rows for t, c in enumerate(row) if c not in repeated)
    quota: dict[tuple[int, int], int] = {}
    for (c, t), n in counts.items():
        term_id = problem.terms[t].id
        rows = [(k, dm[problem.teams[k].id, term_id]) for k in cls.members[c]
                if (problem.teams[k].id, term_id) in dm]
        left = n
        for k, d in rows:
            take = min(d.min, left)
            quota[k, t] = take
            left -= take
        for k, d in rows:
            extra = min(d.max - quota[k, t], left)
            quota[k, t] += extra
            left -= extra
        if left > 0:
            return None
    out: list[list[int]] = [[-1] * len(problem.terms) for _ in class_rows]
    for ln, row in enumerate(class_rows):
        for t, c in enumerate(row):
            if c in repeated:
                continue
            k = max((k for k in cls.members[c] if quota.get((k, t), 0) > 0),
                    key=lambda team: quota[team, t])
            quota[k, t] -= 1
            out[ln][t] = k
    for c in sorted(repeated):
        if not _split_repeated(cls, c, class_rows, out, deadline):
            return None
    return out


def _split_repeated(
    cls: Classes, c: int, class_rows: list[list[int]], out: list[list[int]],
    deadline: float | None = None,
) -> bool:
    """Teams for every cell of class `c`: distinct on each line, fewest positions unfilled."""
    problem = cls.problem
    dm = problem.demand_map()
    model = cp_model.CpModel()
    cells = [(ln, t) for ln, row in enumerate(class_rows) for t, cc in enumerate(row) if cc == c]
    y: dict[tuple[int, int], cp_model.IntVar] = {}
    for i, (_ln, t) in enumerate(cells):
        ks = [k for k in cls.members[c] if (problem.teams[k].id, problem.terms[t].id) in dm]
        for k in ks:
            y[i, k] = model.new_bool_var(f"y[{i},{k}]")
        model.add_exactly_one(y[i, k] for k in ks)
    by_line: dict[tuple[int, int], list[cp_model.IntVar]] = {}
    by_cell: dict[tuple[int, int], list[cp_model.IntVar]] = {}
    for (i, k), v in y.items():
        ln, t = cells[i]
        by_line.setdefault((ln, k), []).append(v)
        by_cell.setdefault((k, t), []).append(v)
    for vs in by_line.values():
        model.add_at_most_one(vs)
    shorts = []
    for (k, t), vs in by_cell.items():
        d = dm[problem.teams[k].id, problem.terms[t].id]
        model.add(sum(vs) <= d.max)
        if d.min > 0:
            short = model.new_int_var(0, d.min, f"short[{k},{t}]")
            model.add(sum(vs) + short >= d.min)
            shorts.append(short)
    model.minimize(sum(shorts))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    seconds = SPLIT_SECONDS
    if deadline is not None:
        seconds = min(seconds, max(0.05, deadline - time.monotonic()))
    solver.parameters.max_time_in_seconds = seconds
    solver.parameters.catch_sigint_signal = False
    if solver.solve(model) not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return False
    for (i, k), v in y.items():
        if solver.boolean_value(v):
            ln, t = cells[i]
            out[ln][t] = k
    return True


def improve_fairness(
    problem: Problem, rows: list[list[int]], categories: list[str], deadline: float
) -> None:
    """Swap one term's teams between two lines while a category's spread drops.

    A swap keeps every (team, term) count, so unfilled positions cannot change; both lines must
    stay valid (checked with the validator's own per-line check).
    """
    flags: list[list[bool]] = []
    for name in categories:
        pred = FAIRNESS_CATEGORIES[name]
        assert callable(pred)
        flags.append([bool(pred(team)) for team in problem.teams])
    if not flags:
        return
    terms = problem.terms

    def rot(row: list[int]) -> dict[str, str]:
        return {terms[t].id: problem.teams[k].id for t, k in enumerate(row)}

    for i, flag in enumerate(flags):
        while time.monotonic() < deadline:
            counts = [sum(flag[k] for k in row) for row in rows]
            hi, lo = max(counts), min(counts)
            if hi - lo <= 1:
                break
            donors = [ln for ln, n in enumerate(counts) if n == hi]
            takers = [ln for ln, n in enumerate(counts) if n == lo]
            moved = False
            for a in donors:
                for b in takers:
                    for t in range(len(terms)):
                        ka, kb = rows[a][t], rows[b][t]
                        if not (flag[ka] and not flag[kb]):
                            continue
                        ra, rb = list(rows[a]), list(rows[b])
                        ra[t], rb[t] = kb, ka
                        if line_violations(problem, rot(ra)) or line_violations(problem, rot(rb)):
                            continue
                        # The swap must not widen another category's spread.
                        if any(not _spread_ok(flags[j], rows, a, b, ra, rb)
                               for j in range(len(flags)) if j != i):
                            continue
                        rows[a], rows[b] = ra, rb
                        moved = True
                        break
                    if moved or time.monotonic() > deadline:
                        break
                if moved or time.monotonic() > deadline:
                    break
            if not moved:
                break


def _spread_ok(
    flag: list[bool], rows: list[list[int]], a: int, b: int, ra: list[int], rb: list[int]
) -> bool:
    before = [sum(flag[k] for k in row) for row in rows]
    after = list(before)
    after[a], after[b] = sum(flag[k] for k in ra), sum(flag[k] for k in rb)
    return max(after) - min(after) <= max(1, max(before) - min(before))


# ------------------------------------------------------------------------------- solve


@dataclass
class _Bound:
    """What column generation proved about unfilled positions."""

    unfilled: int = 0
    infeasible: bool = False
    converged: bool = False


def _column_generation(
    master: Master, pricing: Pricing, deadline: float, callback: _Progress,
    stop: threading.Event | None,
) -> _Bound:
    n = master.n
    bound = _Bound()
    iterations = 0
    while True:
        if not master.solve():
            return bound
        iterations += 1
        if master.value < 1e-9:
            bound.converged = True
            break
        mu, prices = master.prices()
        remaining = deadline - time.monotonic()
        if remaining <= 0.02 or (stop is not None and stop.is_set()):
            break
        columns, rc_bound = pricing.price(mu, prices, min(remaining, 10.0))
        if rc_bound is not None and math.isinf(rc_bound):
            bound.infeasible = True  # not even one valid line exists
            return bound
        if rc_bound is not None:
            lagrange = master.value + n * min(0.0, rc_bound)
            bound.unfilled = max(bound.unfilled, math.ceil(lagrange - 1e-6))
            callback.on_bound(bound.unfilled)
        added = sum(master.add(p) for p in columns)
        callback.emit()
        if not added:
            bound.converged = rc_bound is not None
            break
    logger.trace("column generation: {} iterations, {} columns, LP {:.3f}, unplaced {:.3f}",
                 iterations, len(master.columns), master.value, master.unplaced_lines())
    if bound.converged:
        if master.unplaced_lines() > 1e-6:
            bound.infeasible = True
        else:
            bound.unfilled = max(bound.unfilled, math.ceil(master.value - 1e-6))
    return bound


def _hint_rows(fractional: list[tuple[Pattern, float]], r: int) -> list[Pattern]:
    """r patterns by largest remainder of the fractional parts (the hint of the free lines)."""
    if r <= 0 or not fractional:
        return []
    total = sum(v for _, v in fractional)
    share = [(p, v * r / total) for p, v in fractional]
    out = [p for p, s in share for _ in range(int(s))]
    rest = sorted(share, key=lambda ps: -(ps[1] - int(ps[1])))
    i = 0
    while len(out) < r:
        out.append(rest[i % len(rest)][0])
        i += 1
    return out[:r]


def _residual_cells(cls: Classes, fixed: list[list[int]]) -> dict[tuple[int, int], tuple[int, int]]:
    used = Counter((c, t) for row in fixed for t, c in enumerate(row))
    return {(c, t): (max(0, lo - used[c, t]), max(0, hi - used[c, t]))
            for (c, t), (lo, hi) in cls.cells.items()}


def _dive(
    cls: Classes, master: Master, pricing: Pricing, deadline: float, callback: _Progress,
    stop: threading.Event | None,
) -> list[list[int]]:
    """Residual rounding (cutting-stock style) on the master itself: a column's lower bound is
    the number of lines fixed to it. Fix every column's whole part; when nothing is whole,
    round the largest fractional columns up; re-solve (with pricing) after each step and undo
    a step that makes the LP worse. Stops when DIVE_FREE_LINES lines are left.

    Returns the fixed lines; the master's solution then describes the lines left.
    """
    n = cls.problem.n_job_lines
    lower = [0] * len(master.columns)
    batch_cap = max(1, n // 20)
    rounds = undone = 0
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        rounds += 1
        lower.extend([0] * (len(master.columns) - len(lower)))
        left = n - sum(lower)
        if left <= DIVE_FREE_LINES:
            break
        values = [v.solution_value() for v in master.vars]
        step = {j: math.floor(v + 1e-9) for j, v in enumerate(values)
                if math.floor(v + 1e-9) > lower[j]}
        if not step:
            frac = sorted((j for j, v in enumerate(values) if v - lower[j] > 1e-6),
                          key=lambda j: lower[j] - values[j])
            step = {j: lower[j] + 1 for j in frac[:min(batch_cap, left - DIVE_FREE_LINES)]}
        if not step:
            break
        before = master.value
        for j, lb in step.items():
            master.vars[j].SetLb(lb)
        _column_generation(master, pricing, deadline, callback, stop)
        if master.value > before + 1e-6:
            for j in step:
                master.vars[j].SetLb(lower[j])
            master.solve()
            undone += 1
            if len(step) == 1:
                break  # even one more line makes the LP worse: CP-SAT takes it from here
            batch_cap = 1
            continue
        for j, lb in step.items():
            lower[j] = lb
    fixed = [list(p) for j, p in enumerate(master.columns[: len(lower)])
             for _ in range(lower[j])]
    logger.debug("dive: {} lines fixed, {} left, LP {:.3f}, {} rounds ({} undone)", len(fixed),
                 n - len(fixed), master.value, rounds, undone)
    return fixed


def _free_hint(master: Master, fixed: list[list[int]], r: int) -> list[Pattern]:
    """Patterns for the lines not fixed: the LP's fractional remainder, largest first."""
    lower = Counter(tuple(row) for row in fixed)
    rest = [(p, v - lower[p]) for p, v in master.fractional() if v - lower[p] > 1e-9]
    return _hint_rows(rest, r)


def _integer_step(
    cls: Classes, fixed: list[list[int]], hint: list[Pattern], deadline: float,
    callback: _Progress, stop: threading.Event | None, num_workers: int | None,
    w_unfilled: int,
) -> tuple[list[list[int]] | None, int, Status]:
    """CP-SAT places the lines not `fixed` (the line model over the class problem with the
    residual demand), hinted by `hint`.

    Returns class rows (None when CP-SAT found none), unfilled positions, CP-SAT's status.
    """
    n = cls.problem.n_job_lines
    r = n - len(fixed)
    cells = _residual_cells(cls, fixed)
    if r == 0:
        return fixed, sum(lo for lo, _hi in cells.values()), "OPTIMAL"
    used = Counter((c, t) for row in fixed for t, c in enumerate(row))
    sub = cls.class_problem(r, used)
    try:
        lm = build(sub, multiplicity=cls.multiplicity, deadline=deadline)
    except OutOfTime:
        logger.debug("integer step: no time left to build the model for {} lines", r)
        return None, 0, "UNKNOWN"
    logger.debug("integer step: model for {} lines built", r)
    unfilled = unfilled_expr(lm)
    lm.model.minimize(unfilled)
    pos = [{k: i for i, k in enumerate(ks)} for ks in lm.teams_by_term]
    ordered = sorted(hint[:r], key=lambda p: [pos[t].get(c, 0) for t, c in enumerate(p)])
    for line, p in enumerate(ordered):
        for t, c in enumerate(p):
            for k in lm.teams_by_term[t]:
                lm.model.add_hint(lm.x[line, t, k], k == c)
    # The residual minima are what the fixed lines leave open, so the residual's unfilled
    # positions are the whole plan's.
    callback.full_objective = w_unfilled * unfilled
    callback.bound_scale = 0  # the residual's bound says nothing about the whole plan
    params = parameters(sub, num_workers)
    status, solver = _search(lm, params, deadline - time.monotonic(), callback, stop)
    if status not in ("OPTIMAL", "FEASIBLE"):
        return None, 0, status
    rows = [[-1] * len(sub.terms) for _ in range(r)]
    for (line, t, k), var in lm.x.items():
        if solver.boolean_value(var):
            rows[line][t] = k
    return fixed + rows, round(solver.objective_value), status


def solve_patterns(
    problem: Problem,
    *,
    on_progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    num_workers: int | None = None,
) -> Plan:
    """Solve with the patterns model (see module docstring); same Plan contract as `solve`."""
    from solver.explain import explain_infeasible
    from solver.search import solve

    if _needs_line_model(problem):
        logger.info("patterns model: pins or a previous plan to keep; using the line model")
        return solve(problem.model_copy(update={"options": problem.options.model_copy(
            update={"model": "lines"})}), on_progress=on_progress, stop=stop,
            num_workers=num_workers)
    started = time.monotonic()
    limit = problem.options.time_limit_seconds
    deadline = started + limit
    callback = _Progress(on_progress, limit)
    categories = fairness_categories(problem)
    weights = tier_weights(problem, len(categories), 0)
    w_unfilled = weights["unfilled"]
    cls = make_classes(problem)
    logger.debug("patterns model: {} teams in {} classes", len(problem.teams), len(cls.members))
    n_terms = len(problem.terms)
    master = Master(cls.cells, problem.n_job_lines, n_terms)
    master.deadline = deadline
    pricing = Pricing(cls, num_workers)
    callback.bound_scale = w_unfilled
    # Seed the LP with the greedy construction's lines (as class patterns): measured at 1,000
    # lines and 107 classes, column generation from an empty master had not converged after
    # 30 s; seeded, it converged in two iterations (docs/solver.md).
    seeded: list[list[int]] = []
    if problem.options.construction != "off":  # "off": column generation from scratch
        seeded = construct(cls.class_problem(problem.n_job_lines), seed=problem.options.seed,
                           tries=SEED_TRIES, partial=True,
                           deadline=started + limit * CG_SHARE) or []
    for row in seeded:
        master.add(tuple(row))
    if len(seeded) == problem.n_job_lines:
        # A complete plan already (over classes; every tier reads only class attributes).
        sub = cls.class_problem(problem.n_job_lines)
        tiers = evaluate(sub, categories, seeded)
        callback.external_solution(float(
            w_unfilled * tiers["unfilled_positions"] + weights["fairness"] * sum(
                max(0, v - 1) for k, v in tiers.items() if k.startswith("fairness_"))))
    callback.emit(force=True)
    logger.debug("patterns model: {} seed lines, {} columns, {:.2f}s", len(seeded),
                 len(master.columns), time.monotonic() - started)
    bound = _column_generation(master, pricing, started + limit * CG_SHARE, callback, stop)
    if bound.infeasible or (problem.options.strict_minimum and bound.converged
                            and bound.unfilled > 0):
        callback.emit(force=True)
        return Plan(status="INFEASIBLE", solve_seconds=time.monotonic() - started,
                    explanation=explain_infeasible(problem, explain_deadline(started, limit)),
                    solutions=0)
    logger.debug("column generation: {} columns, LP {:.3f}, bound {} ({}), {:.2f}s",
                 len(master.columns), master.value, bound.unfilled,
                 "converged" if bound.converged else "not converged", time.monotonic() - started)
    fixed = _dive(cls, master, pricing, started + limit * DIVE_SHARE, callback, stop)
    logger.debug("dive done at {:.2f}s", time.monotonic() - started)
    n = problem.n_job_lines
    tail = _free_hint(master, fixed, n - len(fixed))
    best: tuple[list[list[int]], int] | None = None
    proven = False
    free = n - len(fixed)
    while True:
        now = time.monotonic()
        if now >= deadline or (stop is not None and stop.is_set()):
            break
        cut = n - free
        literals = free * len(cls.cells)
        if literals > MAX_STEP_LITERALS and best is not None:
            logger.debug("integer step with {} free lines: {} literals, too large", free,
                         literals)
            break
        if best is not None:
            # The previous attempt's plan, restricted to the lines now free, is a complete
            # hint with its own unfilled count: CP-SAT starts from it and can only improve.
            hint = [tuple(r) for r in best[0][cut:]]
        else:
            hint = [tuple(r) for r in fixed[cut:]] + tail
        last = cut == 0 or free * FREE_GROWTH * len(cls.cells) > MAX_STEP_LITERALS
        # Small residuals often have no exact completion, which CP-SAT may take long to
        # prove: the first attempts get a short slice, the last one the rest.
        share = deadline - now if last else (deadline - now) * STEP_SHARE
        rows, missing, status = _integer_step(cls, fixed[:cut], hint, now + max(share, 0.5),
                                              callback, stop, num_workers, w_unfilled)
        logger.debug("integer step, {} free lines: {} unfilled ({}), {:.2f}s", free, missing,
                     status, time.monotonic() - started)
        if rows is None and cut == 0 and status == "INFEASIBLE":  # the whole class model
            callback.emit(force=True)
            return Plan(status="INFEASIBLE", solve_seconds=time.monotonic() - started,
                        explanation=explain_infeasible(problem, explain_deadline(started, limit)),
                    solutions=0)
        if rows is not None and (best is None or missing < best[1]):
            best = (rows, missing)
            callback.external_solution(float(w_unfilled * missing))
        if rows is not None and (missing <= bound.unfilled or (cut == 0 and status == "OPTIMAL")):
            proven = True
            break
        if cut == 0:
            break
        free = min(n, max(free * FREE_GROWTH, free + 1))
    if best is None:
        return _best_so_far(problem, None, weights, categories, callback, started)
    team_rows = to_teams(cls, best[0], explain_deadline(started, limit))
    if team_rows is None:
        logger.info("patterns model: classes could not be split into teams; line model")
        left = max(0.1, deadline - time.monotonic())
        return solve(problem.model_copy(update={"options": problem.options.model_copy(
            update={"model": "lines", "time_limit_seconds": left})}),
            on_progress=on_progress, stop=stop, num_workers=num_workers)
    improve_fairness(problem, team_rows, categories, min(deadline, time.monotonic() + 2.0))
    tiers = evaluate(problem, categories, team_rows)
    fair = sum(max(0, v - 1) for k, v in tiers.items() if k.startswith("fairness_"))
    final: Status = "OPTIMAL" if proven and fair == 0 else "FEASIBLE"
    unfilled_bound = best[1] if proven else bound.unfilled
    return plan_from_rows(problem, team_rows, status=final, weights=weights,
                          categories=categories, callback=callback, started=started,
                          bound=float(w_unfilled * unfilled_bound))


def _needs_line_model(problem: Problem) -> bool:
    """Pins kept, or a previous plan whose cells count (stability), tell lines apart."""
    prev = problem.previous_plan
    if prev is None or not prev.lines:
        return False
    pins = problem.options.keep_pinned and any(p.pinned for p in prev.lines)
    return pins or problem.options.stability != "off"
