"""The typed messages between the solver parent (`solver.process`) and its child (`solver.child`).

One `SolveRequest` goes down the child's stdin as a single JSON line; the child answers with
`ChildMessage` JSON lines on its stdout, each tagged by `kind`:

    progress   any number, throttled by the solver
    plan       exactly once on success
    oom        the child knows it ran out of memory (or its cap is below its baseline)
    error      the solve raised

Both sides validate with these models, so a field renamed on one side fails loudly in tests
instead of turning into a silently ignored key. The module only needs pydantic and
`solver.problem`, so the child can import it before OR-Tools.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from solver.problem import Plan, Problem, Progress


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SolveRequest(_Message):
    """What the parent asks of a child: one problem, under these limits."""

    problem: Problem
    memory_limit_mb: int = Field(gt=0, description="RLIMIT_AS cap on the child's address space")
    time_limit_s: float = Field(gt=0, description="the solve's time limit (overrides the "
                                                  "problem's options.time_limit_seconds)")
    num_workers: int | None = Field(default=None, ge=1, description="CP-SAT workers; None = "
                                                                    "the solver's default")
    parent_pid: int = Field(gt=0, description="the child exits when its parent is not this pid")

    def problem_to_solve(self) -> Problem:
        """The problem with the request's time limit in its options (what `solve` reads)."""
        options = self.problem.options.model_copy(update={"time_limit_seconds": self.time_limit_s})
        return self.problem.model_copy(update={"options": options})


class ProgressMessage(_Message):
    kind: Literal["progress"] = "progress"
    progress: Progress


class PlanMessage(_Message):
    kind: Literal["plan"] = "plan"
    plan: Plan


class OutOfMemoryMessage(_Message):
    kind: Literal["oom"] = "oom"
    message: str


class ErrorMessage(_Message):
    kind: Literal["error"] = "error"
    message: str


ChildMessage = Annotated[
    ProgressMessage | PlanMessage | OutOfMemoryMessage | ErrorMessage,
    Field(discriminator="kind"),
]
CHILD_MESSAGE: TypeAdapter[ChildMessage] = TypeAdapter(ChildMessage)


def encode(message: ChildMessage) -> str:
    """One protocol line (no newline)."""
    return message.model_dump_json()


def decode(line: bytes | str) -> ChildMessage:
    """Parse one protocol line; raises pydantic.ValidationError on anything else."""
    return CHILD_MESSAGE.validate_json(line)
