"""The executor's three collaborators, as small Protocols (the pgqueuer way).

`RunExecutor` only knows these shapes, so its state machine runs against the real adapters in
production (`listener.db.EngineDB`, `listener.broadcast.DbBroadcaster`,
`listener.solving.ChildProcessSolver`) and against in-memory fakes in milliseconds in tests
(tests/support/fakes.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel

from listener.events import ResultMetadata, RunStatus, UiEvent
from solver import Plan, Problem, Progress
from solver.problem import PlanLine


class ClaimedRun(BaseModel):
    """A run this listener holds: the lease fences every later write."""

    id: uuid.UUID
    organization_id: uuid.UUID
    allocation_run_id: uuid.UUID
    n_job_lines: int
    attempts: int
    max_attempts: int
    lease: uuid.UUID
    created_at: datetime
    #: The run's time cap, decided by the database at insert (planner_engine.limits): the
    #: listener never solves longer, and the ledger reserved exactly this.
    time_limit_s: int


class Beat(BaseModel):
    lease_held: bool
    cancel_requested: bool


class LeaseLost(Exception):
    """The run is no longer ours (swept, re-queued or finished elsewhere): write nothing."""


class RunStore(Protocol):
    """The fenced run functions. Each write raises `LeaseLost` when the lease is gone."""

    async def heartbeat(self, run_id: uuid.UUID, lease: uuid.UUID) -> Beat: ...

    async def load_problem(self, run_id: uuid.UUID, lease: uuid.UUID) -> dict[str, Any]: ...

    async def commit_plan(
        self, run: ClaimedRun, lines: Sequence[PlanLine], result_metadata: ResultMetadata
    ) -> uuid.UUID | None: ...

    async def finish(
        self, run: ClaimedRun, status: RunStatus, error: str | None,
        result_metadata: ResultMetadata | None,
    ) -> None: ...


class EventSink(Protocol):
    """Where UI events go. Best effort: returns False on failure, never raises.

    Each event is sent under the lease of its run (the database sends it only for the lease's
    holder: planner_engine.broadcast)."""

    async def publish(self, event: UiEvent, lease: uuid.UUID) -> bool: ...


class RunningSolve(Protocol):
    """One solve in progress; `stop` asks for the best plan so far, `kill` abandons it."""

    def progress(self) -> AsyncIterator[Progress]: ...

    async def result(self) -> Plan: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...


class SolverRunner(Protocol):
    """Starts solves. `result()` of a solve raises `solver.SolverProcessError` when the
    solver died without a plan (crash, memory cap, killed)."""

    def start(self, problem: Problem, time_limit_s: float) -> RunningSolve: ...

    def prepare_next(self) -> None:
        """Get ready for the next run while this one solves (a no-op where nothing helps)."""

    def close(self) -> None: ...
