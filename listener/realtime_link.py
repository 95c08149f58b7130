"""Wake-ups from Supabase Realtime: postgres_changes on `public.allocation_planner_runs`.

Events are hints only. Realtime is at-most-once (changes during a disconnect are never
replayed), so every (re)subscription triggers a catch-up scan, and the official Python client
gives up after `max_retries` failed reconnects, so this supervisor recreates it, with jittered
back-off (`listener.backoff`), for as long as the listener runs.

The channel is private: a hosted project with public channels disabled refuses a public join
("PrivateOnly: This project only allows private channels"), and Realtime would then never wake
the listener. A private join is authorised by RLS on `realtime.messages` for the token's role
(policy `planner_engine_runs_listener_read`, docs/database.md).

Keys of both kinds work unchanged here: the client puts the key in the socket's `apikey` query
parameter and in each join's `access_token`. For an `sb_secret_` key hosted Realtime takes the
connection's token (the gateway turns the `apikey` into a JWT) and ignores an `access_token` that
starts with `sb_` (supabase/realtime, `RealtimeChannel.assign_access_token`), so the channel
acts as service_role just as with the legacy JWT.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from loguru import logger
from realtime import AsyncRealtimeChannel, RealtimeSubscribeStates
from realtime.types import (
    PostgresChangesPayload,
    RealtimeChannelOptions,
    RealtimePostgresChangesListenEvent,
)
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from listener import metrics
from listener.backoff import Backoff

RunHint = Callable[[uuid.UUID, datetime], None]

TABLE = "allocation_planner_runs"
#: The listener's wake-up channel (a topic of its own; the migrations' policy names it).
CHANNEL = "planner-engine-runs"
#: realtime-py sends `config` as the join payload's config as given, so every section is spelt
#: out (its defaults apply only when no options are passed at all).
CHANNEL_OPTIONS: RealtimeChannelOptions = {
    "config": {
        "broadcast": {"ack": False, "self": False},
        "presence": {"key": "", "enabled": False},
        "private": True,
    }
}


def _parse_ts(value: Any) -> datetime:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return datetime.max


class RealtimeLink:
    """Keeps one subscription alive and reports PENDING runs through `on_run`."""

    def __init__(
        self,
        supabase_url: str,
        service_role_key: str,
        on_run: RunHint,
        on_subscribed: Callable[[], None],
        *,
        stale_after_s: float = 10.0,
    ) -> None:
        self._url = supabase_url
        self._key = service_role_key
        self._on_run = on_run
        self._on_subscribed = on_subscribed
        self._stale_after_s = stale_after_s
        self.subscribed = False
        #: the server confirmed that changes flow ("Subscribed to PostgreSQL"): only then is
        #: an insert certain to produce an event, so only then is the listener ready.
        self.changes_flowing = False
        self.state = "starting"
        self._client: AsyncClient | None = None

    # -- callbacks from the realtime client (sync, on the loop) -----------------------------
    def _on_change(self, payload: PostgresChangesPayload) -> None:
        record: dict[str, Any] = payload.get("data", {}).get("record") or {}
        if record.get("status") != "PENDING":
            return
        try:
            run_id = uuid.UUID(str(record.get("id")))
        except ValueError:
            logger.warning("ignoring a run event with a malformed id: {!r}", record.get("id"))
            return
        self._on_run(run_id, _parse_ts(record.get("created_at")))

    def _on_state(self, status: RealtimeSubscribeStates, err: Exception | None) -> None:
        self.state = str(status.value if hasattr(status, "value") else status)
        was = self.subscribed
        self.subscribed = status == RealtimeSubscribeStates.SUBSCRIBED
        if not self.subscribed:
            self.changes_flowing = False
        metrics.REALTIME_CONNECTED.set(1 if self.subscribed else 0)
        if self.subscribed:
            logger.info("Realtime: subscribed to {} changes", TABLE)
            self._on_subscribed()
        elif was:
            logger.warning("Realtime: subscription {} ({})", self.state, err)

    def _on_system(self, payload: Any) -> None:
        # "Subscribed to PostgreSQL" marks the moment changes really flow: scan again, so
        # nothing inserted between the join reply and this message is missed.
        # realtime-py hands a pydantic SuccessSystemPayload (a dict in older releases).
        message = payload.get("message", "") if isinstance(payload, dict) \
            else getattr(payload, "message", "")
        if "Subscribed to PostgreSQL" in str(message):
            if not self.changes_flowing:
                logger.info("Realtime: changes of {} are flowing", TABLE)
            self.changes_flowing = self.subscribed
            self._on_subscribed()

    # -- lifecycle --------------------------------------------------------------------------
    async def _open(self) -> AsyncClient:
        client = await acreate_client(
            self._url, self._key,
            options=AsyncClientOptions(realtime={"max_retries": 5, "initial_backoff": 0.5}),
        )
        channel: AsyncRealtimeChannel = client.channel(CHANNEL, CHANNEL_OPTIONS)
        for event in (RealtimePostgresChangesListenEvent.Insert,
                      RealtimePostgresChangesListenEvent.Update):
            channel.on_postgres_changes(event, self._on_change, table=TABLE, schema="public")
        channel.on_system(self._on_system)
        await channel.subscribe(self._on_state)
        return client

    async def _close(self) -> None:
        client, self._client = self._client, None
        self.subscribed = False
        self.changes_flowing = False
        metrics.REALTIME_CONNECTED.set(0)
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.realtime.close(), timeout=3)

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise forever: (re)create the client whenever it stays disconnected.

        Retries wait a jittered, growing delay (`listener.backoff`, 0.5 s to 30 s, reset once
        subscribed), so replicas that lost the same server do not come back in lockstep; that
        includes recreating a client that stayed unsubscribed for `stale_after_s`.
        """
        backoff = Backoff(0.5, 30.0)
        first = True
        while not stop.is_set():
            if not first:
                metrics.REALTIME_RECONNECTS.inc()
            first = False
            try:
                self._client = await self._open()
            except Exception as exc:
                self.state = "unreachable"
                delay = backoff.next_delay()
                logger.warning("Realtime: cannot subscribe ({}); retry in {:.1f}s", exc, delay)
                await self._close()
                await _wait(stop, delay)
                continue
            disconnected_since: float | None = None
            while not stop.is_set():
                await _wait(stop, 0.5)
                if self.subscribed:
                    disconnected_since = None
                    backoff.reset()
                    continue
                now = time.monotonic()
                disconnected_since = disconnected_since or now
                if now - disconnected_since > self._stale_after_s:
                    delay = backoff.next_delay()
                    logger.warning(
                        "Realtime: no subscription for {:.0f}s; recreating the client in {:.1f}s",
                        now - disconnected_since, delay,
                    )
                    await self._close()
                    await _wait(stop, delay)
                    break
            await self._close()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or less when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
