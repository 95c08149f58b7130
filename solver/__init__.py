"""Planner solver: generic job lines for a medical allocation run, with OR-Tools CP-SAT.

Public API (the listener codes against exactly this):
`Problem`, `Plan`, `Progress` (pydantic models), `RULE_SETS` (rule-set catalogue),
`validate_plan` (independent checker), `solve` (in-process), and `start_solve` /
`SolveHandle` / `SolverProcessError` / `SolverOutOfMemory` / `SolverCrashed` (child process).
"""

from solver.problem import Plan, Problem, Progress
from solver.process import (
    SolveHandle,
    SolverCrashed,
    SolverOutOfMemory,
    SolverProcessError,
    start_solve,
)
from solver.rules import RULE_SETS
from solver.solve import solve
from solver.validate import validate_plan

__all__ = [
    "RULE_SETS",
    "Plan",
    "Problem",
    "Progress",
    "SolveHandle",
    "SolverCrashed",
    "SolverOutOfMemory",
    "SolverProcessError",
    "solve",
    "start_solve",
    "validate_plan",
]

