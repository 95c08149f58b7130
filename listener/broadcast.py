"""Progress for the manager's UI, as Realtime broadcasts on the private topic `planner_run:<id>`.

The database sends them: `planner_engine.broadcast` (fenced on the run's lease, PL001 without
it) and `planner_engine.announce_queued` (queue positions of runs still PENDING) call
`realtime.send`, which writes a message row that Realtime streams to the topic's subscribers
(docs/database.md, "The service-role key"). So broadcasting needs no Supabase key (the key is
used for the listener's own subscription only), the engine role can speak only on the topic of
a run it holds, no channel is joined per run, and a Realtime outage costs progress events only
(the run row, which the UI also watches, stays the truth). Progress is throttled to at most one
event per `interval` with the latest figures, so a solver finding hundreds of solutions a
second never floods the UI (nor the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence

import asyncpg
from loguru import logger

from listener import metrics
from listener.db import EngineDB
from listener.events import ProgressEvent, UiEvent
from listener.ports import EventSink, LeaseLost


def topic(run_id: uuid.UUID) -> str:
    return f"planner_run:{run_id}"


class DbBroadcaster:
    """The `EventSink` of production: every event goes out through the engine's functions."""

    def __init__(self, db: EngineDB) -> None:
        self._db = db
        #: Why the database refused the latest broadcast (a grant missing, a function gone),
        #: else None: such a refusal drops every event silently, so /readyz reports it. A lost
        #: lease or an unreachable database is not recorded here (the run and `database` say it).
        self.failure: str | None = None

    async def publish(self, event: UiEvent, lease: uuid.UUID) -> bool:
        """Best effort: a failure is logged and counted, never raised."""
        try:
            await self._db.broadcast(event.run_id, lease, event.event, event.payload())
        except LeaseLost:
            logger.info("{} for run {} not sent: the lease is gone", event.event, event.run_id)
            return False
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            self._failed(event.event, event.run_id, exc)
            return False
        self.failure = None
        metrics.BROADCASTS.labels(event=event.event).inc()
        return True

    async def announce_queued(self, run_ids: Sequence[uuid.UUID]) -> bool:
        """`status` (PENDING, queued, the database's position and estimated start) for each
        of these runs still waiting."""
        if not run_ids:
            return True
        try:
            sent = await self._db.announce_queued(run_ids)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            self._failed("status", None, exc)
            return False
        self.failure = None
        metrics.BROADCASTS.labels(event="status").inc(sent)
        return True

    def _failed(self, event: str, run_id: uuid.UUID | None, exc: BaseException) -> None:
        metrics.BROADCAST_FAILURES.inc()
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        if sqlstate.startswith("42"):  # no privilege, function missing: every event is lost
            self.failure = f"{sqlstate}: {exc}"[:200]
        logger.warning("broadcast {} for run {} failed: {}", event, run_id or "(queue)", exc)


class ProgressThrottle:
    """Keeps the newest progress figures and sends them at most once per interval."""

    def __init__(self, sink: EventSink, lease: uuid.UUID, interval: float) -> None:
        self._sink = sink
        self._lease = lease
        self._interval = interval
        self._latest: ProgressEvent | None = None
        self._last_sent = 0.0
        self._task: asyncio.Task[None] | None = None

    def update(self, payload: ProgressEvent) -> None:
        self._latest = payload
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        wait = self._interval - (time.monotonic() - self._last_sent)
        if wait > 0:
            await asyncio.sleep(wait)
        payload, self._latest = self._latest, None
        if payload is not None:
            self._last_sent = time.monotonic()
            await self._sink.publish(payload, self._lease)

    async def close(self) -> None:
        """Send what is pending now (the last figures matter most)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._latest is not None:
            payload, self._latest = self._latest, None
            await self._sink.publish(payload, self._lease)
