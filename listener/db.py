"""The engine's side of the database: typed calls to the fenced `planner_engine` functions.

Every write is fenced on the run's lease inside PostgreSQL, so this module holds no invariant of
its own: it turns rows into typed values and SQLSTATEs into exceptions the worker can act on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel

from listener.events import ResultMetadata, RunStatus
from listener.ports import Beat, ClaimedRun, LeaseLost
from listener.queries import q
from solver.problem import PlanLine

__all__ = ["LEASE_LOST", "Beat", "CheckRow", "ClaimedRun", "EngineDB", "LeaseLost",
           "QueuePosition"]

LEASE_LOST = "PL001"


class CheckRow(BaseModel):
    """One row of `planner_engine.self_check`."""

    check_name: str
    ok: bool
    severity: Literal["error", "warning"]
    detail: str


class QueuePosition(BaseModel):
    """One row of `planner_engine.queue_positions`: a PENDING run, the runs claim_run will
    hand out before it, and the database's estimate of its start (None: no live listener)."""

    id: uuid.UUID
    runs_ahead: int
    estimated_start: datetime | None


def _json(value: Any) -> str:
    return json.dumps(value, default=str)


class EngineDB:
    """A small pool of connections as the `planner_engine` role (the `RunStore` adapter)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def connect(
        cls, dsn: str, *, max_size: int = 4, transaction_pooler: bool = False,
    ) -> EngineDB:
        """Open the pool. Behind a transaction-mode pooler consecutive statements may run on
        different server connections, so a statement prepared on one is unknown on the next:
        asyncpg's statement cache must be off there (`statement_cache_size=0`); it then
        prepares unnamed statements, which live only as long as the one round trip."""
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=max_size, command_timeout=60,
            statement_cache_size=0 if transaction_pooler else 100,
            server_settings={"application_name": "planner-listener"},
        )
        return cls(pool)

    async def self_check(self, expected_version: str | None) -> list[CheckRow]:
        """`planner_engine.self_check`: one row per check, problems included (never raises
        for a failed check; raises when the function itself is missing or not granted)."""
        rows = await self.pool.fetch(q("self_check"), expected_version)
        return [CheckRow.model_validate(dict(r)) for r in rows]

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> bool:
        try:
            async with self.pool.acquire(timeout=2) as conn:
                await conn.fetchval(q("ping"))
            return True
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False

    async def claim(self, worker_id: str, run_id: uuid.UUID | None) -> ClaimedRun | None:
        row = await self.pool.fetchrow(q("claim_run"), worker_id, run_id)
        return ClaimedRun.model_validate(dict(row)) if row else None

    async def heartbeat(self, run_id: uuid.UUID, lease: uuid.UUID) -> Beat:
        row = await self.pool.fetchrow(q("heartbeat"), run_id, lease)
        assert row is not None
        return Beat.model_validate(dict(row))

    async def load_problem(self, run_id: uuid.UUID, lease: uuid.UUID) -> dict[str, Any]:
        try:
            raw = await self.pool.fetchval(q("load_problem"), run_id, lease)
        except asyncpg.PostgresError as exc:
            _raise_lease_lost(exc)
            raise
        return dict(json.loads(raw)) if isinstance(raw, str) else dict(raw)

    async def commit_plan(
        self,
        run: ClaimedRun,
        lines: Sequence[PlanLine],
        result_metadata: ResultMetadata,
    ) -> uuid.UUID | None:
        try:
            snap = await self.pool.fetchval(
                q("commit_plan"), run.id, run.lease, run.organization_id,
                _json({"lines": [ln.model_dump(mode="json") for ln in lines]}),
                result_metadata.model_dump_json(),
            )
        except asyncpg.PostgresError as exc:
            _raise_lease_lost(exc)
            raise
        return snap if snap is None or isinstance(snap, uuid.UUID) else uuid.UUID(str(snap))

    async def finish(
        self,
        run: ClaimedRun,
        status: RunStatus,
        error: str | None = None,
        result_metadata: ResultMetadata | None = None,
    ) -> None:
        try:
            await self.pool.execute(
                q("finish_run"), run.id, run.lease, status.value, error,
                result_metadata.model_dump_json() if result_metadata is not None else None,
            )
        except asyncpg.PostgresError as exc:
            _raise_lease_lost(exc)
            raise

    async def write_logs(self, records: Sequence[dict[str, Any]]) -> int:
        return int(await self.pool.fetchval(q("write_logs"), _json(list(records))) or 0)

    async def refusal_counts(self) -> dict[str, int]:
        """The database's refusal counters by reason (planner_engine.refusal_counts)."""
        rows = await self.pool.fetch(q("refusal_counts"))
        return {str(r["reason"]): int(r["refusals"]) for r in rows}

    async def listener_heartbeat(self, worker_id: str, *, stopping: bool = False) -> None:
        await self.pool.execute(q("listener_heartbeat"), worker_id, stopping)

    async def queue_positions(self, limit: int = 1000) -> list[QueuePosition]:
        rows = await self.pool.fetch(q("queue_positions"), limit)
        return [QueuePosition.model_validate(dict(r)) for r in rows]

    async def pending_runs(self, limit: int = 1000) -> list[tuple[uuid.UUID, datetime]]:
        rows = await self.pool.fetch(q("pending_runs"), limit)
        return [(r["id"], r["created_at"]) for r in rows]

    async def broadcast(
        self, run_id: uuid.UUID, lease: uuid.UUID, event: str, payload: dict[str, Any],
    ) -> None:
        """Send one UI event through the database (raises LeaseLost without the lease)."""
        try:
            await self.pool.execute(q("broadcast"), run_id, lease, event, _json(payload))
        except asyncpg.PostgresError as exc:
            _raise_lease_lost(exc)
            raise

    async def announce_queued(self, run_ids: Sequence[uuid.UUID]) -> int:
        """The database's queue position of each run still PENDING, sent in one call
        (the database computes what is sent); returns how many were sent."""
        return int(await self.pool.fetchval(q("announce_queued"), list(run_ids)) or 0)


def _raise_lease_lost(exc: asyncpg.PostgresError) -> None:
    if getattr(exc, "sqlstate", None) == LEASE_LOST:
        raise LeaseLost(str(exc)) from exc
