"""The run state machine against in-memory ports: every ending, in milliseconds.

The same endings are exercised end to end against the real stack in test_end_to_end.py and
test_operations.py; here each one is isolated, including the orders of events the UI relies on.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from listener.events import DoneEvent, Phase, ProgressEvent, RunStatus, StatusEvent
from listener.executor import RunExecutor
from listener.outcome import Outcome, StopReason, decide, metadata_of
from listener.ports import LeaseLost
from listener.settings import ListenerSettings
from solver import Plan, Progress
from solver.generate import generate
from solver.problem import PlanLine
from tests.support.fakes import InMemoryStore, RecordingSink, ScriptedSolver

RAW: dict[str, Any] = generate(lines=3, terms=5, teams=6, rule_sets=[], seed=1).model_dump(
    mode="json")
PLAN = Plan(status="OPTIMAL", objective=4.0, best_bound=4.0, gap=0.0, solutions=2,
            lines=[PlanLine(line=i, rotations={"t1": "a"}, pinned=["t1"] if i == 1 else [])
                   for i in (1, 2, 3)])
PROGRESS = [Progress(solutions=1, objective=9.0, elapsed_ms=5, time_limit_ms=5000),
            Progress(solutions=2, objective=4.0, elapsed_ms=9, time_limit_ms=5000)]


def settings(**over: Any) -> ListenerSettings:
    base: dict[str, Any] = {
        "PLANNER_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/db",
        "SUPABASE_URL": "http://127.0.0.1:1", "SUPABASE_SERVICE_ROLE_KEY": "k",
        "heartbeat_interval_s": 0.01, "progress_interval_s": 0.001, "shutdown_grace_s": 0.05,
        "worker_id": "w-test",
    }
    return ListenerSettings(**{**base, **over})


class Rig:
    def __init__(self, solver: ScriptedSolver, raw: dict[str, Any] | None = None,
                 time_limit_s: int = 120, **over: Any) -> None:
        self.store, self.sink, self.solver = InMemoryStore(), RecordingSink(), solver
        self.executor = RunExecutor(self.store, self.sink, solver, settings(**over))
        self.run = self.store.claim(raw if raw is not None else RAW, time_limit_s=time_limit_s)
        self.draining = asyncio.Event()

    @property
    def stored(self) -> Any:
        return self.store.runs[self.run.id]

    async def execute(self) -> Outcome:
        return await asyncio.wait_for(self.executor.execute(self.run, self.draining), 5)

    def statuses(self) -> list[tuple[RunStatus, Phase]]:
        return [(e.status, e.phase) for e in self.sink.events if isinstance(e, StatusEvent)]


async def test_a_plan_is_committed_and_done_is_the_last_and_only_terminal_event():
    rig = Rig(ScriptedSolver(PLAN, progress=PROGRESS))
    assert await rig.execute() is Outcome.COMPLETED
    assert rig.stored.status is RunStatus.COMPLETED and rig.stored.writes == 1
    assert rig.stored.lines == PLAN.lines, "the solver's lines, pins included, are committed"
    assert rig.stored.metadata.objective == 4.0 and rig.stored.metadata.worker_id == "w-test"
    assert rig.statuses() == [(RunStatus.GENERATING, Phase.LOADING),
                              (RunStatus.GENERATING, Phase.SOLVING),
                              (RunStatus.GENERATING, Phase.WRITING)]
    names = rig.sink.names()
    assert names[-1] == "done" and names.count("done") == 1
    assert "progress" in names and names.index("progress") < names.index("done")
    done = rig.sink.events[-1]
    assert isinstance(done, DoneEvent) and done.snapshot_id is not None
    assert done.result == rig.stored.metadata, "done carries the row's result_metadata"
    last_progress = [e for e in rig.sink.events if isinstance(e, ProgressEvent)][-1]
    assert last_progress.solutions == 2, "the last figures are never throttled away"
    assert rig.solver.started[0].time_limit_s == RAW["options"]["time_limit_seconds"]


async def test_infeasible_keeps_the_explanation():
    plan = Plan(status="INFEASIBLE", explanation=["Term 1: too few teams"])
    rig = Rig(ScriptedSolver(plan))
    assert await rig.execute() is Outcome.INFEASIBLE
    assert rig.stored.status is RunStatus.INFEASIBLE and rig.stored.lines is None
    assert rig.stored.metadata.explanation == ["Term 1: too few teams"]
    assert rig.sink.events[-1] == DoneEvent(run_id=rig.run.id, status=RunStatus.INFEASIBLE,
                                            result=rig.stored.metadata)


async def test_no_plan_within_the_time_limit_fails_naming_the_limit():
    rig = Rig(ScriptedSolver(Plan(status="UNKNOWN")), time_limit_s=7)
    assert await rig.execute() is Outcome.FAILED
    assert rig.stored.error == "no feasible plan found within the 7s time limit"
    assert rig.solver.started[0].time_limit_s == 7, "the row's cap wins over the options'"


async def test_the_row_cap_applies_when_the_options_name_no_limit():
    """The solver's own default (30 s) is not the run's cap: time_limit_s is (issue 13)."""
    raw = {**RAW, "options": {k: v for k, v in RAW["options"].items()
                              if k != "time_limit_seconds"}}
    rig = Rig(ScriptedSolver(PLAN), raw=raw, time_limit_s=45)
    assert await rig.execute() is Outcome.COMPLETED
    assert rig.solver.started[0].time_limit_s == 45


def test_the_old_time_limit_variable_stops_the_listener_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PLANNER_SOLVER_TIME_LIMIT_S is no longer read; still set, it must not silently differ
    from the database's cap."""
    from pydantic import ValidationError

    from listener.settings import summarise_errors

    monkeypatch.setenv("PLANNER_SOLVER_TIME_LIMIT_S", "120")
    with pytest.raises(ValidationError) as info:
        settings()
    line = summarise_errors(info.value)
    assert line.startswith("PLANNER_SOLVER_TIME_LIMIT_S: no longer read") and "\n" not in line
    assert "max_time_limit_s" in line


async def test_invalid_input_fails_before_any_solve():
    rig = Rig(ScriptedSolver(PLAN), raw={**RAW, "rule_sets": ["NOPE"]})
    assert await rig.execute() is Outcome.FAILED
    assert rig.stored.error.startswith("invalid input: ") and "NOPE" in rig.stored.error
    assert rig.stored.metadata.validation_errors
    assert rig.solver.started == []
    assert rig.sink.names() == ["status", "done"]


async def test_a_solver_crash_fails_with_its_message():
    rig = Rig(ScriptedSolver(None, crash="the solver process died (signal 11)"))
    assert await rig.execute() is Outcome.FAILED
    assert rig.stored.error == "solver failed: the solver process died (signal 11)"
    assert rig.stored.metadata is None


async def test_a_cancel_seen_at_a_heartbeat_stops_the_search_and_writes_no_plan():
    rig = Rig(ScriptedSolver(None, on_stop=PLAN))
    rig.store.request_cancel(rig.run.id)
    assert await rig.execute() is Outcome.CANCELLED
    assert rig.solver.started[0].stopped and not rig.solver.started[0].killed
    assert rig.stored.status is RunStatus.CANCELLED and rig.stored.lines is None
    assert rig.sink.events[-1] == DoneEvent(run_id=rig.run.id, status=RunStatus.CANCELLED)


async def test_a_lost_lease_kills_the_solve_and_writes_and_announces_nothing():
    rig = Rig(ScriptedSolver(None))
    rig.store.lose_lease_at_heartbeat(rig.run.id, 2)
    assert await rig.execute() is Outcome.LEASE_LOST
    assert rig.store.heartbeats == 2
    assert rig.solver.started[0].killed
    assert rig.stored.writes == 0
    assert "done" not in rig.sink.names()


async def test_a_lease_lost_before_loading_writes_nothing():
    rig = Rig(ScriptedSolver(PLAN))
    rig.store.lose_lease(rig.run.id)
    assert await rig.execute() is Outcome.LEASE_LOST
    assert rig.solver.started == [] and rig.stored.writes == 0


async def test_shutdown_past_the_grace_hands_the_run_back():
    rig = Rig(ScriptedSolver(None))
    rig.draining.set()
    assert await rig.execute() is Outcome.REQUEUED
    assert rig.solver.started[0].killed
    assert rig.stored.status is RunStatus.PENDING and rig.stored.writes == 1
    assert rig.sink.events[-1] == StatusEvent(run_id=rig.run.id, status=RunStatus.PENDING,
                                              phase=Phase.QUEUED)
    assert "done" not in rig.sink.names()


async def test_a_solve_finishing_within_the_grace_is_committed():
    rig = Rig(ScriptedSolver(PLAN), shutdown_grace_s=5)
    rig.draining.set()
    assert await rig.execute() is Outcome.COMPLETED
    assert rig.solver.prepared == 1, "no spare child is prepared once draining"


async def test_a_cancelled_task_hands_the_run_back_and_kills_the_solve():
    rig = Rig(ScriptedSolver(None))
    task = asyncio.create_task(rig.executor.execute(rig.run, rig.draining))
    await asyncio.wait_for(rig.solver.first_started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.solver.started[0].killed
    assert rig.stored.status is RunStatus.PENDING


async def test_an_unexpected_error_fails_the_run_with_one_line():
    rig = Rig(ScriptedSolver(PLAN))
    rig.store.fail_commit = RuntimeError("disk full\nsecond line")
    assert await rig.execute() is Outcome.FAILED
    assert rig.stored.error == "internal error: RuntimeError: disk full"
    assert rig.sink.names()[-1] == "done"


async def test_a_lease_lost_at_commit_is_not_failed():
    rig = Rig(ScriptedSolver(PLAN))
    rig.store.fail_commit = LeaseLost("lease lost: swept")
    assert await rig.execute() is Outcome.LEASE_LOST
    assert rig.stored.writes == 0 and "done" not in rig.sink.names()


@pytest.mark.parametrize(("status", "stop", "expected"), [
    ("OPTIMAL", StopReason.FINISHED, RunStatus.COMPLETED),
    ("FEASIBLE", StopReason.FINISHED, RunStatus.COMPLETED),
    ("INFEASIBLE", StopReason.FINISHED, RunStatus.INFEASIBLE),
    ("UNKNOWN", StopReason.FINISHED, RunStatus.FAILED),
    ("INVALID", StopReason.FINISHED, RunStatus.FAILED),
    ("FEASIBLE", StopReason.CANCELLED, RunStatus.CANCELLED),
    ("OPTIMAL", StopReason.SHUTDOWN, RunStatus.PENDING),
    ("UNKNOWN", StopReason.SHUTDOWN, RunStatus.PENDING),
])
def test_decide_maps_every_plan_and_stop_to_one_status(
    status: Any, stop: StopReason, expected: RunStatus
) -> None:
    plan = Plan(status=status, lines=PLAN.lines if status in ("OPTIMAL", "FEASIBLE") else [])
    result = decide(plan, stop, metadata_of(plan, worker_id="w", attempt=1), 30)
    assert result.status is expected
    assert (result.lines is not None) == (expected is RunStatus.COMPLETED)
    assert (result.error is not None) == (expected is RunStatus.FAILED)


def test_result_metadata_reports_tiers_from_the_plan_not_the_weights() -> None:
    """Issue 12: the same plan under two instances' weightings reports the same tiers."""
    counts = {"unfilled_positions": 0, "fairness_service_spread": 1,
              "changed_cells_beyond_pins": 0}
    a = PLAN.model_copy(update={"status": "FEASIBLE", "objective": 2.0, "best_bound": 0.0,
                                "penalties": {**counts, "weight_unfilled": 4,
                                              "weight_fairness": 2}})
    b = a.model_copy(update={"objective": 1252.0, "penalties": {
        **counts, "weight_unfilled": 1252, "weight_fairness": 25}})
    ma, mb = (metadata_of(p, worker_id="w", attempt=1) for p in (a, b))
    assert ma.tiers == mb.tiers and ma.summary == mb.summary
    assert ma.summary == "0 unfilled positions (proven); service spread 1 (best found)"
    assert [(t.name, t.value, t.proven) for t in ma.tiers] == [
        ("unfilled", 0, True), ("fairness_service", 1, False)]
    assert metadata_of(Plan(status="UNKNOWN"), worker_id="w", attempt=1).summary is None


async def test_a_request_over_the_memory_cap_is_refused_before_the_solve_starts() -> None:
    """Issue 12: refused with what to change (FAILED), never started and killed mid-solve."""
    rig = Rig(ScriptedSolver(PLAN), solver_memory_mb=64)
    assert await rig.execute() is Outcome.FAILED
    assert rig.solver.started == [], "no solve may start"
    assert rig.stored.status is RunStatus.FAILED
    error = rig.stored.error
    assert error.startswith("request too large for the solver's memory cap: 3 lines")
    assert "ask for at most" in error and "raise the solver's memory cap" in error
