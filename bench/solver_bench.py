"""Solver benchmark: our CP-SAT model vs a naive CP-SAT model vs a plain MIP (HiGHS).

Run: .venv/bin/python bench/solver_bench.py [--quick]
     .venv/bin/python bench/solver_bench.py --tight [--sizes 125,250] [--seeds 1,2] [--cap 60]
         [--site-subspecialties] [--no-highs]

`--tight` runs the tight instances of issue 12 (planted plan, every used cell's min = its
planted count, max = it or one more) with the patterns model, today's line model and plain
CP-SAT (and HiGHS unless --no-highs) side by side in the same run, each capped at `--cap`
seconds and 4 GiB of address space (a capped baseline counts as a loss).

Prints one table. Every run happens in a fresh child process so "peak memory" is that run's
own peak resident set. Times are wall-clock seconds measured inside the solving process
("first" = first feasible plan, "optimal" = optimality proven, "-" = not within the limit).
Not a timed test: figures depend on the machine (and on who else uses its cores).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from solver.generate import generate
from solver.problem import Problem

WORKERS = 2


@dataclass
class Row:
    instance: str
    approach: str
    status: str
    first_s: float | None
    optimal_s: float | None
    objective: float | None
    gap: float | None
    peak_mb: float | None
    note: str = ""


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------- our solver


MEMORY_CAP_MB = 4096


def _cap_memory() -> None:
    """The baselines' 4 GiB cap (address space, like the solver child's own cap)."""
    cap = MEMORY_CAP_MB * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_ours(problem_json: str, symmetry: str, construction: str,
             model: str = "lines") -> dict[str, Any]:
    """Our solver, through the production child-process path (start_solve)."""
    from solver.process import start_solve

    problem = Problem.model_validate_json(problem_json)
    problem = problem.model_copy(update={"options": problem.options.model_copy(
        update={"symmetry": symmetry, "construction": construction, "model": model})})

    async def go() -> dict[str, Any]:
        handle = start_solve(problem, num_workers=WORKERS, memory_limit_mb=MEMORY_CAP_MB)
        first = None
        async for p in handle.progress():
            if first is None and p.solutions:
                first = p.elapsed_ms / 1000
        plan = await handle.result()
        return {"status": plan.status, "first_s": first, "seconds": plan.solve_seconds,
                "unfilled": sum(u.missing for u in plan.unfilled) if plan.lines else None,
                "optimal_s": plan.solve_seconds if plan.status == "OPTIMAL" else None,
                "objective": plan.objective, "gap": plan.gap, "peak_mb": plan.peak_memory_mb,
                "plan": plan.model_dump()}

    return asyncio.run(go())


# ---------------------------------------------------------------------- naive CP-SAT


def run_naive(problem_json: str) -> dict[str, Any]:
    """Same constraints, no symmetry breaking, no greedy hint, one weighted solve."""
    from ortools.sat.python import cp_model

    from solver.model import build, unfilled_expr

    _cap_memory()
    problem = Problem.model_validate_json(problem_json)
    problem = problem.model_copy(update={"options": problem.options.model_copy(
        update={"symmetry": "none"})})
    started = time.monotonic()
    lm = build(problem)
    first: list[float] = []

    class Cb(cp_model.CpSolverSolutionCallback):
        def on_solution_callback(self) -> None:
            if not first:
                first.append(time.monotonic() - started)

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = problem.options.time_limit_seconds
    solver.parameters.num_workers = WORKERS
    status = solver.solve(lm.model, Cb())
    name = solver.status_name(status)
    found = name in ("OPTIMAL", "FEASIBLE")
    obj = solver.objective_value if found else None
    gap = (abs(obj - solver.best_objective_bound) / max(1.0, abs(obj))) if obj is not None else None
    return {"status": name, "first_s": first[0] if first else None,
            "seconds": time.monotonic() - started,
            "unfilled": round(solver.value(unfilled_expr(lm))) if found else None,
            "optimal_s": time.monotonic() - started if name == "OPTIMAL" else None,
            "objective": obj, "gap": gap, "peak_mb": _peak_mb()}


# ------------------------------------------------------------------------- HiGHS MIP


def run_mip(problem_json: str) -> dict[str, Any]:
    """A plain MIP of the same problem (weighted sums for the weeks rules), solved by HiGHS."""
    import highspy
    import numpy as np

    from solver.problem import LEAVE, NIGHTS
    from solver.rules import LONG_TERM_WEEKS, combine, pct_cap, pct_floor

    _cap_memory()
    problem = Problem.model_validate_json(problem_json)
    started = time.monotonic()
    spec = combine(problem.rule_sets)
    n, terms, teams = problem.n_job_lines, problem.terms, problem.teams
    weeks = [t.weeks for t in terms]
    total = sum(weeks)
    tix = {t.id: i for i, t in enumerate(terms)}
    kix = {t.id: i for i, t in enumerate(teams)}
    dem = {(kix[d.team], tix[d.term]): d for d in problem.demand}
    cost: list[float] = []
    lb: list[float] = []
    ub: list[float] = []
    integer: list[int] = []

    def col(lo: float, hi: float, c: float = 0.0) -> int:
        cost.append(c)
        lb.append(lo)
        ub.append(hi)
        integer.append(len(cost) - 1)
        return len(cost) - 1

    x: dict[tuple[int, int, int], int] = {}
    by_line: dict[int, list[tuple[int, int, int]]] = {ln: [] for ln in range(n)}
    for (k, t) in dem:
        forbidden = spec.forbid_nights and teams[k].has_tag(NIGHTS)
        for ln in range(n):
            j = col(0, 0 if forbidden else 1)
            x[ln, t, k] = j
            by_line[ln].append((t, k, j))
    rows: list[tuple[float, float, list[int], list[float]]] = []
    inf = highspy.kHighsInf

    def row(lo: float, hi: float, terms_: list[tuple[int, float]]) -> None:
        if terms_:
            rows.append((lo, hi, [j for j, _ in terms_], [v for _, v in terms_]))

    # Exactly one team per line and term; never the same team twice.
    for ln in range(n):
        for t in range(len(terms)):
            row(1, 1, [(j, 1.0) for tt, _k, j in by_line[ln] if tt == t])
        for k in range(len(teams)):
            row(-inf, 1, [(j, 1.0) for _t, kk, j in by_line[ln] if kk == k])
    # Per-team-term capacity and soft minimum.
    w_unfilled, w_fair = 16.0, 1.0
    shorts = []
    for (k, t), d in dem.items():
        cells = [(x[ln, t, k], 1.0) for ln in range(n)]
        row(-inf, d.max, cells)
        if d.min > 0:
            s = col(0, d.min, w_unfilled)
            shorts.append(s)
            row(d.min, inf, [*cells, (s, 1.0)])

    def group_weeks(ln: int, pred: Any) -> list[tuple[int, float]]:
        return [(j, float(weeks[t])) for t, k, j in by_line[ln] if pred(teams[k])]

    for ln in range(n):
        if spec.max_subspecialty_pct is not None:
            cap = pct_cap(total, spec.max_subspecialty_pct)
            for sub in {t.subspecialty.lower() for t in teams}:
                row(-inf, cap, group_weeks(ln, lambda tm, s=sub: tm.subspecialty.lower() == s))
        if spec.max_specialty_pct is not None:
            cap = pct_cap(total, spec.max_specialty_pct)
            for sp in {t.specialty.lower() for t in teams}:
                row(-inf, cap, group_weeks(ln, lambda tm, s=sp: tm.specialty.lower() == s))
        if spec.max_service_pct is not None:
            row(-inf, pct_cap(total, spec.max_service_pct),
                group_weeks(ln, lambda tm: tm.kind == "service"))
        if spec.min_clinical_pct is not None:
            row(pct_floor(total, spec.min_clinical_pct), inf,
                group_weeks(ln, lambda tm: tm.kind == "clinical"))
        if spec.max_non_clinical_terms is not None:
            row(-inf, spec.max_non_clinical_terms,
                [(j, 1.0) for _t, k, j in by_line[ln] if teams[k].kind == "non_clinical"])
        for e in spec.experiences:
            row(1, inf, [(j, 1.0) for _t, k, j in by_line[ln] if e in teams[k].experiences])
        if spec.min_long_terms is not None:
            long_t = [t for t in range(len(terms)) if weeks[t] >= LONG_TERM_WEEKS]
            row(-inf, len(long_t) - spec.min_long_terms,
                [(j, 1.0) for t, k, j in by_line[ln] if t in long_t and teams[k].has_tag(LEAVE)])
        for name, need in spec.min_specialty_weeks.items():
            row(need, inf, group_weeks(ln, lambda tm, s=name: tm.specialty.lower() == s))
        if spec.max_rural_terms is not None:
            row(-inf, spec.max_rural_terms,
                [(j, 1.0) for _t, k, j in by_line[ln] if teams[k].rural])
        if spec.no_consecutive_service:
            for t in range(len(terms) - 1):
                row(-inf, 1, [(j, 1.0) for tt, k, j in by_line[ln]
                              if tt in (t, t + 1) and teams[k].kind == "service"])
    # Fairness: spread beyond 1 of service, nights and rural terms per line.
    cats = {"service": lambda tm: tm.kind == "service", "nights": lambda tm: tm.has_tag(NIGHTS),
            "rural": lambda tm: tm.rural}
    for pred in cats.values():
        if not any(pred(t) for t in teams):
            continue
        hi, lo = col(0, len(terms)), col(0, len(terms))
        ex = col(0, len(terms), w_fair)
        for ln in range(n):
            cnt = [(j, 1.0) for _t, k, j in by_line[ln] if pred(teams[k])]
            row(0, inf, [(hi, 1.0)] + [(j, -v) for j, v in cnt])
            row(-inf, 0, [(lo, 1.0)] + [(j, -v) for j, v in cnt])
        row(-1, inf, [(ex, 1.0), (hi, -1.0), (lo, 1.0)])

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", problem.options.time_limit_seconds)
    h.setOptionValue("threads", WORKERS)
    h.setOptionValue("mip_rel_gap", 0.0)
    h.setOptionValue("random_seed", problem.options.seed)
    ncol = len(cost)
    h.addCols(ncol, np.array(cost), np.array(lb), np.array(ub), 0, np.array([], dtype=np.int32),
              np.array([], dtype=np.int32), np.array([], dtype=np.float64))
    starts, idx, val = [], [], []
    for _lo, _hi, js, vs in rows:
        starts.append(len(idx))
        idx.extend(js)
        val.extend(vs)
    h.addRows(len(rows), np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
              len(idx), np.array(starts, dtype=np.int32), np.array(idx, dtype=np.int32),
              np.array(val, dtype=np.float64))
    h.changeColsIntegrality(ncol, np.arange(ncol, dtype=np.int32),
                            np.array([highspy.HighsVarType.kInteger] * ncol))
    first: list[float] = []

    def on_improving(_event: Any) -> None:
        if not first:
            first.append(time.monotonic() - started)

    h.cbMipImprovingSolution.subscribe(on_improving)
    h.run()
    info = h.getInfo()
    status = h.modelStatusToString(h.getModelStatus())
    has_sol = info.primal_solution_status == 2
    obj = info.objective_function_value if has_sol else None
    optimal = status == "Optimal"
    unfilled = None
    if has_sol:
        values = h.getSolution().col_value
        unfilled = round(sum(values[j] for j in shorts))
    return {"status": "OPTIMAL" if optimal else ("FEASIBLE" if has_sol else status.upper()),
            "first_s": first[0] if first else None,
            "seconds": time.monotonic() - started, "unfilled": unfilled,
            "optimal_s": time.monotonic() - started if optimal else None,
            "objective": obj, "gap": info.mip_gap if has_sol else None, "peak_mb": _peak_mb(),
            "note": f"{ncol} cols, {len(rows)} rows"}


# ------------------------------------------------------------------------------ driver


def isolated(fn: Any, *args: Any) -> dict[str, Any]:
    """Run fn in a fresh spawned process (own peak memory, nothing shared)."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            result: dict[str, Any] = pool.submit(fn, *args).result()
            return result
        except Exception as exc:  # a failing baseline is a result, not a crash of the bench
            return {"status": f"ERROR {type(exc).__name__}", "first_s": None, "optimal_s": None,
                    "objective": None, "gap": None, "peak_mb": None, "note": str(exc)[:60]}


def replan_kept(problem: Problem, plan_json: dict[str, Any]) -> tuple[float, int, str]:
    """Change one used team's demand in T3 (one line fewer) and re-plan with stability."""
    from solver.search import solve

    lines = plan_json["lines"]
    team = lines[0]["rotations"]["T3"]
    count = sum(1 for pl in lines if pl["rotations"]["T3"] == team)
    data = problem.model_dump()
    for d in data["demand"]:
        if d["team"] == team and d["term"] == "T3":
            d["max"] = count - 1
            d["min"] = min(d["min"], d["max"])
    data["previous_plan"] = {"lines": [{"line": pl["line"], "rotations": pl["rotations"]}
                                       for pl in lines]}
    new_problem = Problem.model_validate(data)
    new = solve(new_problem, num_workers=WORKERS)
    other = [(pl.line, t) for pl in new.lines for t in pl.rotations
             if not (t == "T3" and lines[pl.line - 1]["rotations"][t] == team)]
    prev = {pl["line"]: pl["rotations"] for pl in lines}
    kept = sum(1 for ln, t in other if new.lines[ln - 1].rotations[t] == prev[ln][t])
    return kept / len(other), new.changed_cells, new.status


def fmt(v: float | None, pattern: str = "{:.2f}") -> str:
    return "-" if v is None else pattern.format(v)


TIGHT_SHAPES = {  # lines -> (terms, teams, rule sets), the instances
    125: (4, 60, ["VIC_PGY2", "NO_NIGHTS", "NO_CONSECUTIVE_SERVICE"]),
    250: (5, 83, ["VIC_PGY1", "MAX_ONE_RURAL"]),
    500: (5, 167, ["VIC_PGY1", "MAX_ONE_RURAL"]),
    1000: (5, 333, ["VIC_PGY1", "MAX_ONE_RURAL"]),
    2000: (5, 667, ["VIC_PGY1", "MAX_ONE_RURAL"]),
}


def tight(args: argparse.Namespace) -> None:
    """The tight instances: patterns vs lines vs plain CP-SAT (vs HiGHS), same run."""
    from solver.generate import generate as gen

    started = time.monotonic()
    out: list[str] = []
    head = (f"| {'instance':66} | {'approach':14} | {'status':10} | {'first s':>7} | "
            f"{'end s':>6} | {'unfilled':>8} | {'peak MiB':>8} |")
    out.append(head)
    out.append("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for size in [int(x) for x in args.sizes.split(",")]:
        terms, teams, rule_sets = TIGHT_SHAPES[size]
        for seed in [int(x) for x in args.seeds.split(",")]:
            problem = gen(lines=size, terms=terms, teams=teams, rule_sets=rule_sets, seed=seed,
                          tight=True, site_subspecialties=args.site_subspecialties)
            problem = problem.model_copy(update={"options": problem.options.model_copy(
                update={"time_limit_seconds": args.cap})})
            pj = problem.model_dump_json()
            from solver.patterns import make_classes

            classes = len(make_classes(problem).members)
            label = (f"{size} {'+'.join(rule_sets)} s{seed} ({len(problem.teams)} teams, "
                     f"{classes} cl)")
            runs: list[tuple[str, Any, tuple[Any, ...]]] = [
                ("patterns", run_ours, (pj, "first_term", "full", "patterns")),
                ("lines (today)", run_ours, (pj, "first_term", "full", "lines")),
                ("plain cpsat", run_naive, (pj,)),
            ]
            if not args.no_highs:
                runs.append(("highs mip", run_mip, (pj,)))
            for name, fn, fargs in runs:
                if name != "patterns" and size > args.baseline_max:
                    out.append(f"| {label:66} | {name:14} | {'not run':10} | {'-':>7} | "
                               f"{'-':>6} | {'-':>8} | {'-':>8} |")
                    continue
                r = isolated(fn, *fargs)
                print(f"  done {label} / {name}: {r['status']}", file=sys.stderr, flush=True)
                out.append(f"| {label:66} | {name:14} | {r['status'][:10]:10} | "
                           f"{fmt(r['first_s']):>7} | {fmt(r.get('seconds')):>6} | "
                           f"{fmt(r.get('unfilled'), '{:d}'):>8} | "
                           f"{fmt(r['peak_mb'], '{:.0f}'):>8} |")
    for line in out:
        print(line)
    print(f"workers per run: {WORKERS}; cap {args.cap:g} s and {MEMORY_CAP_MB} MiB per run; "
          f"total bench time {time.monotonic() - started:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="60 and 125 lines only, 15 s limits")
    ap.add_argument("--tight", action="store_true", help="the tight instances of issue 12")
    ap.add_argument("--sizes", default="125,250,500,1000", help="tight: line counts")
    ap.add_argument("--seeds", default="1,2,3", help="tight: generator seeds")
    ap.add_argument("--cap", type=float, default=120.0, help="tight: seconds per run")
    ap.add_argument("--baseline-max", type=int, default=1000,
                    help="tight: largest size the baselines run at")
    ap.add_argument("--site-subspecialties", action="store_true",
                    help="tight: subspecialties distinct per site (more classes)")
    ap.add_argument("--no-highs", action="store_true", help="tight: leave HiGHS out")
    args = ap.parse_args()
    if args.tight:
        tight(args)
        return
    specs = [("60 VIC_PGY1", 60, 5, 45, ["VIC_PGY1"], 30.0),
             ("125 VIC_PGY1", 125, 5, 60, ["VIC_PGY1"], 30.0),
             ("250 VIC_PGY1", 250, 5, 90, ["VIC_PGY1"], 60.0),
             ("125 VIC_PGY2+NO_NIGHTS", 125, 4, 60, ["VIC_PGY2", "NO_NIGHTS"], 30.0)]
    if args.quick:
        specs = [(a, b, c, d, e, 15.0) for a, b, c, d, e, _ in specs[:2]]
    rows: list[Row] = []
    replan: list[str] = []
    started = time.monotonic()
    for label, lines, terms, teams, rule_sets, limit in specs:
        problem = generate(lines=lines, terms=terms, teams=teams, rule_sets=rule_sets, seed=1)
        problem = problem.model_copy(update={"options": problem.options.model_copy(
            update={"time_limit_seconds": limit})})
        pj = problem.model_dump_json()
        label = f"{label} ({len(problem.teams)} teams)"
        runs: list[tuple[str, Any, tuple[Any, ...]]] = [
            ("ours (default)", run_ours, (pj, "first_term", "full")),
            ("ours first_term, search", run_ours, (pj, "first_term", "hint_only")),
            ("ours lex, search", run_ours, (pj, "lex", "hint_only")),
            ("ours no sym-break, search", run_ours, (pj, "none", "hint_only")),
            ("naive cpsat", run_naive, (pj,)),
            ("highs mip", run_mip, (pj,)),
        ]
        if args.quick:
            runs = [r for r in runs if r[0] != "ours no sym-break, search"]
        for name, fn, fargs in runs:
            r = isolated(fn, *fargs)
            rows.append(Row(label, name, r["status"], r["first_s"], r["optimal_s"],
                            r["objective"], r["gap"], r["peak_mb"], r.get("note", "")))
            print(f"  done {label} / {name}: {r['status']}", file=sys.stderr, flush=True)
            if name.endswith("(default)") and lines == 125 and "VIC_PGY1" in rule_sets \
                    and "plan" in r:
                kept, changed, status = replan_kept(problem, r["plan"])
                replan.append(f"{label}: re-plan after one team's demand in T3 drops by one: "
                              f"{kept * 100:.1f} % of the other cells kept "
                              f"({changed} cells changed, {status})")
    head = (f"| {'instance':34} | {'approach':26} | {'status':9} | {'first s':>7} | "
            f"{'optimal s':>9} | {'objective':>9} | {'gap':>7} | {'peak MiB':>8} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r.instance:34} | {r.approach:26} | {r.status[:9]:9} | {fmt(r.first_s):>7} | "
              f"{fmt(r.optimal_s):>9} | {fmt(r.objective, '{:g}'):>9} | "
              f"{fmt(r.gap, '{:.1%}'):>7} | {fmt(r.peak_mb, '{:.0f}'):>8} |")
    for line in replan:
        print(line)
    print(f"workers per run: {WORKERS}; total bench time {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
