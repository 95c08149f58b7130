"""Wall clock vs time limit (issue 12: "a solve returns its best plan within the limit plus 2 s,
explanation included, at every size").

Run: nice -n 19 .venv/bin/python bench/limit_bench.py [--sizes 250,1000,2000] [--limit 5]
     [--models patterns,lines]

Each solve runs in this process (child start-up excluded, as in solver_bench's "first s"), on
the tight generated instances of bench/solver_bench.py, and prints one row per (size, model):
wall seconds, the limit, the overrun beyond the limit, status and unfilled positions.
"""

from __future__ import annotations

import argparse
import time

from solver.generate import generate
from solver.search import solve

#: line count -> (terms, teams, rule sets), as bench/solver_bench.py's TIGHT_SHAPES.
SHAPES: dict[int, tuple[int, int, list[str]]] = {
    125: (4, 60, ["VIC_PGY2", "NO_NIGHTS", "NO_CONSECUTIVE_SERVICE"]),
    250: (5, 83, ["VIC_PGY1", "MAX_ONE_RURAL"]),
    500: (5, 167, ["VIC_PGY1", "MAX_ONE_RURAL"]),
    1000: (5, 333, ["VIC_PGY1", "MAX_ONE_RURAL"]),
    2000: (5, 667, ["VIC_PGY1", "MAX_ONE_RURAL"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="250,1000,2000")
    ap.add_argument("--limit", type=float, default=5.0)
    ap.add_argument("--models", default="patterns,lines")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(f"| {'lines':>5} | {'model':8} | {'limit s':>7} | {'wall s':>6} | {'over s':>6} | "
          f"{'status':10} | {'unfilled':>8} |")
    print("|------:|----------|--------:|-------:|-------:|------------|---------:|")
    for size in [int(x) for x in args.sizes.split(",")]:
        terms, teams, rules = SHAPES[size]
        problem = generate(lines=size, terms=terms, teams=teams, rule_sets=rules,
                           seed=args.seed, tight=True, time_limit_seconds=args.limit)
        for model in args.models.split(","):
            p = problem.model_copy(update={"options": problem.options.model_copy(
                update={"model": model})})
            started = time.monotonic()
            plan = solve(p)
            wall = time.monotonic() - started
            unfilled = sum(u.missing for u in plan.unfilled) if plan.lines else None
            print(f"| {size:>5} | {model:8} | {args.limit:>7g} | {wall:>6.2f} | "
                  f"{max(0.0, wall - args.limit):>6.2f} | {plan.status:10} | "
                  f"{'-' if unfilled is None else unfilled:>8} |", flush=True)


if __name__ == "__main__":
    main()
