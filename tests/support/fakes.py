"""In-memory adapters of the executor's ports (listener.ports), for millisecond tests.

They keep the rules the real adapters enforce where the executor relies on them: every store
write is fenced on the lease (`LeaseLost` otherwise) and a run is written at most once, so a
test of the state machine fails where production would.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from listener.events import ResultMetadata, RunStatus, UiEvent
from listener.ports import Beat, ClaimedRun, LeaseLost
from solver import Plan, Problem, Progress, SolverCrashed
from solver.problem import PlanLine


@dataclass
class StoredRun:
    raw: dict[str, Any]
    lease: uuid.UUID
    status: RunStatus = RunStatus.GENERATING
    cancel_requested: bool = False
    error: str | None = None
    metadata: ResultMetadata | None = None
    lines: list[PlanLine] | None = None
    writes: int = 0


class InMemoryStore:
    """`RunStore` over a dict of runs."""

    def __init__(self) -> None:
        self.runs: dict[uuid.UUID, StoredRun] = {}
        self.heartbeats = 0
        self.fail_commit: Exception | None = None  # raised by the next commit_plan
        self._sweep_at: tuple[int, uuid.UUID] | None = None

    def claim(self, raw: dict[str, Any], attempts: int = 1,
              time_limit_s: int = 120) -> ClaimedRun:
        """A GENERATING run holding a fresh lease, as `claim_run` returns it."""
        run = ClaimedRun(id=uuid.uuid4(), organization_id=uuid.uuid4(),
                         allocation_run_id=uuid.uuid4(), n_job_lines=int(raw["n_job_lines"]),
                         attempts=attempts, max_attempts=3, lease=uuid.uuid4(),
                         created_at=datetime.now(UTC), time_limit_s=time_limit_s)
        self.runs[run.id] = StoredRun(raw=raw, lease=run.lease)
        return run

    # -- what tests do to a run behind the executor's back ---------------------------------
    def lose_lease(self, run_id: uuid.UUID) -> None:
        """The sweeper re-queued it: the old lease no longer fences anything."""
        self.runs[run_id].lease = uuid.uuid4()
        self.runs[run_id].status = RunStatus.PENDING

    def lose_lease_at_heartbeat(self, run_id: uuid.UUID, n: int) -> None:
        """The sweeper takes the run away just before heartbeat number `n` is answered."""
        self._sweep_at = (n, run_id)

    def request_cancel(self, run_id: uuid.UUID) -> None:
        self.runs[run_id].cancel_requested = True

    # -- RunStore -------------------------------------------------------------------------------
    def _held(self, run_id: uuid.UUID, lease: uuid.UUID) -> StoredRun:
        run = self.runs[run_id]
        if run.lease != lease or run.status is not RunStatus.GENERATING:
            raise LeaseLost(f"lease lost: run {run_id} is {run.status}")
        return run

    async def heartbeat(self, run_id: uuid.UUID, lease: uuid.UUID) -> Beat:
        self.heartbeats += 1
        if self._sweep_at is not None and self._sweep_at == (self.heartbeats, run_id):
            self.lose_lease(run_id)
        run = self.runs[run_id]
        held = run.lease == lease and run.status is RunStatus.GENERATING
        return Beat(lease_held=held, cancel_requested=run.cancel_requested)

    async def load_problem(self, run_id: uuid.UUID, lease: uuid.UUID) -> dict[str, Any]:
        return dict(self._held(run_id, lease).raw)

    async def commit_plan(
        self, run: ClaimedRun, lines: Sequence[PlanLine], result_metadata: ResultMetadata
    ) -> uuid.UUID | None:
        stored = self._held(run.id, run.lease)
        if self.fail_commit is not None:
            exc, self.fail_commit = self.fail_commit, None
            raise exc
        stored.status, stored.lines, stored.metadata = RunStatus.COMPLETED, list(lines), \
            result_metadata
        stored.writes += 1
        return uuid.uuid4()

    async def finish(
        self, run: ClaimedRun, status: RunStatus, error: str | None,
        result_metadata: ResultMetadata | None,
    ) -> None:
        stored = self._held(run.id, run.lease)
        stored.status, stored.error, stored.metadata = status, error, result_metadata
        stored.writes += 1
        if status is RunStatus.PENDING:
            stored.lease = uuid.uuid4()  # handed back: the next claim gets a new lease


class RecordingSink:
    """`EventSink` that keeps every event, in the order it was published."""

    def __init__(self) -> None:
        self.events: list[UiEvent] = []
        self.leases: list[uuid.UUID] = []  # the lease each event was sent under

    async def publish(self, event: UiEvent, lease: uuid.UUID) -> bool:
        self.events.append(event)
        self.leases.append(lease)
        return True

    def names(self) -> list[str]:
        return [e.event for e in self.events]


@dataclass
class FakeSolve:
    """A `RunningSolve` driven by the test: it ends when the script says so, or on stop/kill."""

    problem: Problem
    time_limit_s: float
    plan: Plan | None  # returned at once (after `progress`); None: only ends when stopped
    on_stop: Plan
    progress_items: list[Progress]
    crash: str | None = None
    stopped: bool = False
    killed: bool = False
    _done: asyncio.Future[Plan] = field(init=False)
    _queue: asyncio.Queue[Progress | None] = field(init=False)

    def __post_init__(self) -> None:
        self._done = asyncio.get_running_loop().create_future()
        self._queue = asyncio.Queue()
        for p in self.progress_items:
            self._queue.put_nowait(p)
        if self.crash is not None:
            self._end(error=SolverCrashed(self.crash))
        elif self.plan is not None:
            self._end(plan=self.plan)

    def _end(self, plan: Plan | None = None, error: Exception | None = None) -> None:
        if self._done.done():
            return
        self._queue.put_nowait(None)
        if error is not None:
            self._done.set_exception(error)
        else:
            assert plan is not None
            self._done.set_result(plan)

    async def progress(self) -> AsyncIterator[Progress]:
        while (item := await self._queue.get()) is not None:
            yield item

    async def result(self) -> Plan:
        return await asyncio.shield(self._done)

    def stop(self) -> None:
        self.stopped = True
        self._end(plan=self.on_stop)

    def kill(self) -> None:
        self.killed = True
        self._end(error=SolverCrashed("the solver was killed (SIGKILL)"))


class ScriptedSolver:
    """`SolverRunner` whose solves follow the script given to the constructor."""

    def __init__(self, plan: Plan | None, *, on_stop: Plan | None = None,
                 progress: Sequence[Progress] = (), crash: str | None = None) -> None:
        self.plan, self.crash, self.progress = plan, crash, list(progress)
        self.on_stop = on_stop or plan or Plan(status="UNKNOWN")
        self.started: list[FakeSolve] = []
        self.first_started = asyncio.Event()
        self.prepared = 0
        self.closed = False

    def start(self, problem: Problem, time_limit_s: float) -> FakeSolve:
        solve = FakeSolve(problem, time_limit_s, self.plan, self.on_stop, self.progress,
                          self.crash)
        self.started.append(solve)
        self.first_started.set()
        return solve

    def prepare_next(self) -> None:
        self.prepared += 1

    def close(self) -> None:
        self.closed = True
