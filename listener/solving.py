"""The production `SolverRunner`: each solve in a child process (solver.process).

Keeps one spare child pre-started when `PLANNER_SOLVER_SPARE` is on, so the next run skips the
child's start-up (about 1.3 s of one core for Python and OR-Tools).
"""

from __future__ import annotations

from listener.ports import RunningSolve
from listener.settings import ListenerSettings
from solver import Problem, SpareChild, start_solve


class ChildProcessSolver:
    def __init__(self, settings: ListenerSettings) -> None:
        self.s = settings
        self.spare = SpareChild() if settings.solver_spare else None
        if self.spare is not None:
            self.spare.refill()

    def start(self, problem: Problem, time_limit_s: float) -> RunningSolve:
        return start_solve(problem, memory_limit_mb=self.s.solver_memory_mb,
                           time_limit_s=time_limit_s, num_workers=self.s.solver_workers,
                           spare=self.spare)

    def prepare_next(self) -> None:
        if self.spare is not None:
            self.spare.refill()  # a no-op while the spare is alive

    def close(self) -> None:
        if self.spare is not None:
            self.spare.close()
