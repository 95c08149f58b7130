"""The engine's contract with the UI: run states, phases, broadcast events, `result_metadata`.

Every payload the UI receives is one of the models below, so its shape lives in one place (and
is published as JSON Schema in docs/listener.md, checked by a test). Each carries a `version`
that changes only when a field is removed or changes meaning; new optional fields keep it, so
a UI should ignore fields it does not know.

Broadcast events on the private channel `planner_run:<run id>`, in this order for one attempt:
`status` (phase `queued`, repeated as the position changes) → `status` (`loading`) →
`status` (`solving`) → any number of `progress` → `status` (`writing`) → one `done`. A run
handed back to the queue (listener shutdown) ends its attempt with `status` (`PENDING`,
`queued`) instead of `done`; a run whose lease was lost gets nothing from this attempt.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from solver.problem import Progress, Unfilled

#: The version every payload below carries.
EVENT_VERSION: Literal[1] = 1


class RunStatus(StrEnum):
    """`allocation_planner_runs.status` (the table's CHECK constraint lists the same values)."""

    PENDING = "PENDING"
    GENERATING = "GENERATING"
    COMPLETED = "COMPLETED"
    INFEASIBLE = "INFEASIBLE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class Phase(StrEnum):
    """Where a run is, as the UI's progress indicator shows it."""

    QUEUED = "queued"
    LOADING = "loading"
    SOLVING = "solving"
    WRITING = "writing"


def _open_schema(schema: dict[str, Any]) -> None:
    """Published schemas allow unknown fields: a UI must accept an engine that added some."""
    schema.pop("additionalProperties", None)


class _Payload(BaseModel):
    # The engine never sends a field it did not declare (forbid); UIs must ignore new ones.
    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_open_schema)

    version: Literal[1] = EVENT_VERSION


class _Event(_Payload):
    #: the Realtime broadcast `event` name
    event: ClassVar[str]

    run_id: uuid.UUID

    def payload(self) -> dict[str, Any]:
        """The JSON object sent as the broadcast's payload."""
        return self.model_dump(mode="json")


class StatusEvent(_Event):
    """The run moved to another phase (or, while queued, to another position)."""

    event: ClassVar[str] = "status"

    status: RunStatus
    phase: Phase
    position: int | None = Field(
        default=None, ge=1,
        description="Place in the queue of every listener (1 = next: the runs that will be "
                    "claimed before this one, plus one); queued only.")
    estimated_start: datetime | None = Field(
        default=None,
        description="The database's estimate of when a queued run starts (null: no listener "
                    "is alive, or not queued).")


class ProgressEvent(_Event):
    """The solver's latest figures, at most one per `PLANNER_PROGRESS_INTERVAL_S`.

    The fields repeat `solver.Progress` on purpose: this is the UI's contract, so a change to
    the solver's internal message must not change what UIs receive without a change here
    (`of` fails loudly when the two drift apart).
    """

    event: ClassVar[str] = "progress"

    solutions: int
    objective: float | None = None
    best_bound: float | None = None
    gap: float | None = None
    elapsed_ms: int
    time_limit_ms: int

    @classmethod
    def of(cls, run_id: uuid.UUID, progress: Progress) -> ProgressEvent:
        return cls(run_id=run_id, **progress.model_dump())


class TierFigure(BaseModel):
    """One objective tier on its own scale (issue 12): read from the plan, not the weights."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_open_schema)

    name: str = Field(description="`unfilled`, `fairness_<category>` (a spread) or "
                                   "`changed_cells`, in the order the solver optimises them.")
    value: int
    bound: int | None = Field(default=None, description="Proven lower bound, where known.")
    proven: bool = Field(description="No plan does better on this tier (given the ones above).")


class ResultMetadata(_Payload):
    """`allocation_planner_runs.result_metadata`: what the solve found, for the UI and audits.

    Written for COMPLETED, INFEASIBLE and the FAILED runs that got as far as the solver (time
    limit reached without a plan) or that had invalid input (`validation_errors`); NULL for
    CANCELLED runs and solver crashes, whose `error` says it all.
    """

    solver_status: str | None = None
    objective: float | None = None
    best_bound: float | None = None
    gap: float | None = None
    solve_seconds: float | None = None
    solutions: int | None = None
    unfilled: list[Unfilled] = Field(default_factory=list)
    changed_cells: int | None = None
    penalties: dict[str, float | int] = Field(default_factory=dict)
    tiers: list[TierFigure] = Field(
        default_factory=list,
        description="Each tier on its own scale: the same plan always reports the same numbers "
                    "(`objective` is the weighted sum, whose weights change with the instance).")
    summary: str | None = Field(
        default=None, description="The tiers in words, e.g. \"0 unfilled positions (proven); "
                                  "service spread 1 (best found)\".")
    explanation: list[str] | None = Field(
        default=None, description="Why no plan exists, in a manager's words (INFEASIBLE), "
                                  "or that none was found within the time limit (FAILED).")
    validation_errors: list[str] | None = Field(
        default=None, description="Why the run's input is not a valid problem (FAILED).")
    peak_memory_mb: float | None = None
    worker_id: str | None = Field(default=None, description="The listener process that ran it.")
    attempt: int | None = None


class DoneEvent(_Event):
    """The attempt is over and the row is final: the last event of a run."""

    event: ClassVar[str] = "done"

    status: RunStatus
    error: str | None = None
    snapshot_id: uuid.UUID | None = Field(
        default=None, description="job_lines_history snapshot of the plan this run replaced.")
    result: ResultMetadata | None = Field(
        default=None, description="The same object as the row's result_metadata.")


UiEvent = StatusEvent | ProgressEvent | DoneEvent


def json_schemas() -> dict[str, dict[str, Any]]:
    """The published JSON Schema of every UI payload, by name (docs/listener.md)."""
    return {
        "status": StatusEvent.model_json_schema(),
        "progress": ProgressEvent.model_json_schema(),
        "done": DoneEvent.model_json_schema(),
        "result_metadata": ResultMetadata.model_json_schema(),
    }


def schema_markdown() -> str:
    """The JSON Schema section of docs/listener.md (`python -m listener.events` prints it)."""
    import json

    parts = []
    for name, schema in json_schemas().items():
        parts.append(f"#### `{name}`\n\n```json\n{json.dumps(schema, indent=2)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(schema_markdown(), end="")
