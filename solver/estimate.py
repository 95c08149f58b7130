"""Will a request fit in the solver's memory cap? Refuse it before the solve starts (issue 12).

Why: a run the cap cannot hold used to be killed mid-solve ("solver ran out of memory (limit
2048 MiB)" after 84 s at 500 lines, SIGSEGV at 1,000). The line model's memory grows with its
literals (line x term x team cells with a demand row), so a request whose estimate exceeds the
cap is refused at once with a message that says what to change.

Calibration (bench, 2 CP-SAT workers, tight 250-line instance, 101,250 literals): 387 MiB peak
resident, ~2.8 KiB per literal over a ~110 MiB baseline; the cap limits *address space*, which
runs well above resident memory (glibc arenas, thread stacks; ~280 MiB at start-up). Hence 5 KiB
per literal over a 300 MiB base: 500 lines x 167 teams (the issue's out-of-memory case at 2 GiB)
is refused, 250 lines fit in ~0.8 GiB. The patterns model never builds more than
`patterns.MAX_STEP_LITERALS` literals at once (measured ≤ 160 MiB at 2,000 lines).
"""

from __future__ import annotations

from solver.problem import Problem

#: Address space of a solving child before any model (interpreter, OR-Tools, threads).
BASE_MB = 300.0
#: Address space per line x term x team literal of the line model, search included.
KB_PER_LITERAL = 5.0
#: Largest line-model literal count the patterns model builds at once (its integer step).
PATTERNS_LITERALS = 60_000


def literals_per_line(problem: Problem) -> int:
    """Term x team cells with a demand row: the line model's literals for one line."""
    cells = {(d.team, d.term) for d in problem.demand}
    return len(cells)


def uses_line_model(problem: Problem) -> bool:
    """The patterns model hands pins and a previous plan to keep to the line model."""
    if problem.options.model == "lines":
        return True
    prev = problem.previous_plan
    if prev is None or not prev.lines:
        return False
    pins = problem.options.keep_pinned and any(p.pinned for p in prev.lines)
    return pins or problem.options.stability != "off"


def estimate_mb(problem: Problem) -> float:
    """Estimated peak address space of solving `problem`, in MiB."""
    per_line = literals_per_line(problem)
    if uses_line_model(problem):
        literals = problem.n_job_lines * per_line
    else:
        literals = min(problem.n_job_lines * per_line, PATTERNS_LITERALS)
    return BASE_MB + literals * KB_PER_LITERAL / 1024


def memory_refusal(problem: Problem, memory_limit_mb: float) -> str | None:
    """One line saying what to change when `problem` will not fit; None when it fits."""
    need = estimate_mb(problem)
    if need <= memory_limit_mb:
        return None
    per_line = max(1, literals_per_line(problem))
    fit = int((memory_limit_mb - BASE_MB) * 1024 / KB_PER_LITERAL / per_line)
    advice = [f"ask for at most {max(0, fit)} job lines"]
    if problem.options.model == "lines":
        advice.append('use options.model "patterns"')
    elif uses_line_model(problem):
        advice.append("drop the pins or set options.stability \"off\" (the patterns model "
                      "then applies)")
    advice.append(f"or raise the solver's memory cap above {need:.0f} MiB "
                  "(PLANNER_SOLVER_MEMORY_MB, planner solve --memory-mb)")
    return (f"request too large for the solver's memory cap: {problem.n_job_lines} lines x "
            f"{len(problem.terms)} terms x {len(problem.teams)} teams need about {need:.0f} MiB "
            f"(cap {memory_limit_mb:.0f} MiB); {', '.join(advice)}")
