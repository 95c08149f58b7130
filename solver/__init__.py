"""Planner solver: generic job lines for a medical allocation run, with OR-Tools CP-SAT.

Public API (the listener codes against exactly this):
`Problem`, `Plan`, `Progress` (pydantic models), `RULE_SETS` (rule-set catalogue),
`validate_plan` (independent checker), `solve` (in-process), and `start_solve` /
`SolveHandle` / `SpareChild` / `solve_in_child` / `SolverProcessError` / `SolverOutOfMemory` /
`SolverCrashed` (child process).
"""

from solver.problem import Plan, Problem, Progress
from solver.process import (
    SolveHandle,
    SolverCrashed,
    SolverOutOfMemory,
    SolverProcessError,
    SpareChild,
    solve_in_child,
    start_solve,
)
from solver.rules import RULE_SETS
from solver.validate import validate_plan

TYPE_CHECKING = False
if TYPE_CHECKING:
    from solver.search import solve


def __getattr__(name: str) -> object:
    """`solve` is imported on first use: it loads OR-Tools (about 1.3 s and 50 MB), which the
    listener process and most `planner` commands never need, since solves run in a child."""
    if name == "solve":
        from solver.search import solve

        globals()["solve"] = solve
        return solve
    raise AttributeError(f"module 'solver' has no attribute {name!r}")


__all__ = [
    "RULE_SETS",
    "Plan",
    "Problem",
    "Progress",
    "SolveHandle",
    "SolverCrashed",
    "SolverOutOfMemory",
    "SolverProcessError",
    "SpareChild",
    "solve",
    "solve_in_child",
    "start_solve",
    "validate_plan",
]
