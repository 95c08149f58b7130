"""How a run attempt ends: a pure decision, so every ending is one table row and one test.

The executor gathers facts (the plan, what stopped the search, why the input was refused) and
asks this module what they mean; it never decides an ending inline. The one place that writes
and announces the result is `RunExecutor._conclude`.

| facts                                   | status      | written              |
|-----------------------------------------|-------------|----------------------|
| plan OPTIMAL/FEASIBLE, search finished  | COMPLETED   | `commit_plan`        |
| plan INFEASIBLE                         | INFEASIBLE  | explanation          |
| plan UNKNOWN (time limit, nothing found)| FAILED      | "no feasible plan …" |
| user cancel (whatever the plan)         | CANCELLED   | nothing else         |
| listener shutdown past the grace        | PENDING     | handed back          |
| invalid input / solver crash / bug      | FAILED      | one-line error       |
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from listener.events import ResultMetadata, RunStatus, TierFigure
from solver import Plan
from solver.problem import PlanLine
from solver.tiers import tiers_of


class StopReason(StrEnum):
    """What ended the search."""

    FINISHED = "finished"  # the solver's own ending: optimal, infeasible or its time limit
    CANCELLED = "cancelled"  # the user asked (request_cancel), seen at a heartbeat
    SHUTDOWN = "shutdown"  # the listener is stopping and the grace period ran out


class Outcome(StrEnum):
    """How the attempt ended, as counted in `planner_runs_total{outcome}` and logged."""

    COMPLETED = "COMPLETED"
    INFEASIBLE = "INFEASIBLE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REQUEUED = "REQUEUED"
    LEASE_LOST = "LEASE_LOST"


@dataclass(frozen=True)
class Result:
    """What to write for an attempt. `lines` is set exactly when the plan is committed."""

    outcome: Outcome
    status: RunStatus | None  # None: write nothing (the lease is gone)
    error: str | None = None
    metadata: ResultMetadata | None = None
    lines: tuple[PlanLine, ...] | None = None


def metadata_of(plan: Plan, *, worker_id: str, attempt: int) -> ResultMetadata:
    """The plan's figures as stored in `result_metadata` (tiers read from the plan itself)."""
    tiers = tiers_of(plan)
    return ResultMetadata(
        solver_status=plan.status, objective=plan.objective, best_bound=plan.best_bound,
        gap=plan.gap, solve_seconds=plan.solve_seconds, solutions=plan.solutions,
        unfilled=plan.unfilled, changed_cells=plan.changed_cells, penalties=plan.penalties,
        explanation=plan.explanation, peak_memory_mb=plan.peak_memory_mb,
        tiers=[TierFigure(name=t.name, value=t.value, bound=t.bound, proven=t.proven)
               for t in tiers],
        summary="; ".join(t.words() for t in tiers) or None,
        worker_id=worker_id, attempt=attempt,
    )


def decide(plan: Plan, stop: StopReason, metadata: ResultMetadata, time_limit_s: float) -> Result:
    """The ending of a solve that returned `plan` after `stop`."""
    if stop is StopReason.CANCELLED:
        return Result(Outcome.CANCELLED, RunStatus.CANCELLED)
    if stop is StopReason.SHUTDOWN:
        return requeued()
    if plan.status in ("OPTIMAL", "FEASIBLE"):
        return Result(Outcome.COMPLETED, RunStatus.COMPLETED, metadata=metadata,
                      lines=tuple(plan.lines))
    if plan.status == "INFEASIBLE":
        return Result(Outcome.INFEASIBLE, RunStatus.INFEASIBLE, metadata=metadata)
    reason = (f"no feasible plan found within the {time_limit_s:.0f}s time limit"
              if plan.status == "UNKNOWN" else f"solver returned {plan.status}")
    return Result(Outcome.FAILED, RunStatus.FAILED, error=reason, metadata=metadata)


def failed(error: str, metadata: ResultMetadata | None = None) -> Result:
    """An attempt that cannot produce a plan; `error` is the run's one-line message."""
    return Result(Outcome.FAILED, RunStatus.FAILED, error=error, metadata=metadata)


def invalid_input(reason: str, messages: list[str]) -> Result:
    """The run's input is not a valid problem: `reason` is one readable line."""
    return failed(f"invalid input: {reason}", ResultMetadata(validation_errors=messages))


def requeued() -> Result:
    """Hand the run back to the queue (PENDING) for this or another listener."""
    return Result(Outcome.REQUEUED, RunStatus.PENDING)


LEASE_LOST = Result(Outcome.LEASE_LOST, None)
