"""Hosted Realtime's per-tenant rate limits, reproduced with its own counting method.

Supabase Realtime (`lib/realtime/rate_counter/rate_counter.ex`, `lib/realtime/tenants.ex`)
counts events in a counter that is read and reset every `tick` (5 s), keeps the last 12
readings and compares their average rate (sum / readings / tick seconds) with the tenant's
`max_events_per_second` (`TENANT_MAX_EVENTS_PER_SECOND`, 100 by default in
`config/runtime.exs`). Once the average reaches the limit the counter is "triggered" until a
later tick finds it below the limit again. Consequences hosted users see, mirrored here:

* a channel that receives a message while the events counter is triggered is shut down with
  `system` "Too many messages per second" (`realtime_channel.ex`, `:update_rate_counter`);
* REST batches are refused with 429 when the average already exceeds the limit ("You have
  exceeded your rate limit") or the batch would take it over ("Too many messages to
  broadcast, please reduce the batch size") (`tenants/batch_broadcast.ex`);
* postgres_changes are skipped while the separate database-events counter is triggered
  (`replication_poller.ex`).

The average is over the readings so far, at most 12 (one minute at hosted's tick): a burst is
spread over the last minute, except in a counter's first minute, when fewer readings weigh it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from loguru import logger

TICK_S = 5.0
MAX_BUCKETS = 12
MAX_EVENTS_PER_SECOND = 100


class RateCounter:
    """An events counter with hosted's tick/bucket/average semantics."""

    def __init__(self, name: str, limit: float, tick_s: float = TICK_S) -> None:
        self.name = name
        self.limit = limit
        self.tick_s = tick_s
        self.count = 0
        self.buckets: deque[int] = deque(maxlen=MAX_BUCKETS)
        self.avg = 0.0
        self.triggered = False
        self._task: asyncio.Task[None] | None = None

    def add(self, n: int = 1) -> None:
        self.count += n

    def tick(self) -> None:
        """Close the current reading and re-evaluate the limit (hosted's `:tick`)."""
        self.buckets.appendleft(self.count)
        self.count = 0
        self.avg = sum(self.buckets) / len(self.buckets) / self.tick_s
        if self.triggered and self.avg < self.limit:
            self.triggered = False
        elif not self.triggered and self.avg >= self.limit:
            self.triggered = True
            logger.warning("{}: rate limit reached ({:.1f}/s >= {}/s)",
                           self.name, self.avg, self.limit)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            self.tick()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def batch_refusal(counter: RateCounter, batch_size: int) -> str | None:
    """Hosted's REST check before a batch: the 429 message, or None to accept it."""
    if counter.avg > counter.limit:
        return "You have exceeded your rate limit"
    if batch_size + counter.avg > counter.limit:
        return "Too many messages to broadcast, please reduce the batch size"
    return None
