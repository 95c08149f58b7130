"""Progress for the manager's UI, as Realtime broadcasts on the private topic `planner_run:<id>`.

Sent through Realtime's REST broadcast endpoint with the service-role key (a secret `sb_secret_`
key goes in the `apikey` header only, a legacy JWT also as the bearer: listener.apikeys): no
channel join per
run, the same call works against hosted Supabase, and a Realtime outage costs progress events
only (the run row, which the UI also watches, stays the truth). Progress is throttled to at
most one event per `interval` with the latest figures, so a solver finding hundreds of
solutions a second never floods the UI.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import httpx
from loguru import logger

from listener import metrics
from listener.apikeys import rest_headers
from listener.events import ProgressEvent, UiEvent
from listener.ports import EventSink


def topic(run_id: uuid.UUID) -> str:
    return f"planner_run:{run_id}"


class Broadcaster:
    def __init__(self, supabase_url: str, service_role_key: str) -> None:
        self._url = f"{supabase_url}/realtime/v1/api/broadcast"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(3.0),
            headers={**rest_headers(service_role_key), "Content-Type": "application/json"},
        )
        #: Why the server refused the key (401/403) on the latest broadcast, else None: a
        #: refused key drops every progress event silently, so /readyz reports it.
        self.auth_failure: str | None = None

    async def close(self) -> None:
        await self._client.aclose()

    async def send(self, run_id: uuid.UUID, event: str, payload: dict[str, Any]) -> bool:
        """Best effort: a failure is logged and counted, never raised."""
        body = {
            "messages": [
                {"topic": topic(run_id), "event": event, "payload": payload, "private": True}
            ]
        }
        try:
            resp = await self._client.post(self._url, json=body)
            if resp.status_code in (401, 403):
                self.auth_failure = f"status {resp.status_code}: {resp.text[:200]}"
            if resp.status_code >= 300:
                raise httpx.HTTPStatusError(
                    f"status {resp.status_code}", request=resp.request, response=resp
                )
        except (httpx.HTTPError, OSError) as exc:
            metrics.BROADCAST_FAILURES.inc()
            logger.warning("broadcast {} for run {} failed: {}", event, run_id, exc)
            return False
        self.auth_failure = None
        metrics.BROADCASTS.labels(event=event).inc()
        return True

    async def publish(self, event: UiEvent) -> bool:
        """Send one UI event (listener.events) on its run's topic."""
        return await self.send(event.run_id, event.event, event.payload())


class ProgressThrottle:
    """Keeps the newest progress figures and sends them at most once per interval."""

    def __init__(self, sink: EventSink, interval: float) -> None:
        self._sink = sink
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
            await self._sink.publish(payload)

    async def close(self) -> None:
        """Send what is pending now (the last figures matter most)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._latest is not None:
            payload, self._latest = self._latest, None
            await self._sink.publish(payload)
