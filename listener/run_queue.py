"""The single solver queue: run ids waiting for this process's one solver slot.

Entries are *hints*: a Realtime event or a catch-up scan says "this run looked PENDING". The
database decides with `claim_run`, so a stale or duplicate hint only costs one cheap claim
that returns nothing. Oldest run first, each run id at most once.
"""

from __future__ import annotations

import asyncio
import heapq
import uuid
from datetime import datetime


class RunQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[datetime, uuid.UUID]] = []
        self._queued: set[uuid.UUID] = set()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queued)

    def put(self, run_id: uuid.UUID, created_at: datetime) -> bool:
        """Queue a run; returns False when it is already waiting."""
        if run_id in self._queued:
            return False
        self._queued.add(run_id)
        heapq.heappush(self._heap, (created_at, run_id))
        self._changed.set()
        return True

    def discard(self, run_id: uuid.UUID) -> None:
        if run_id in self._queued:
            self._queued.remove(run_id)
            self._heap = [e for e in self._heap if e[1] != run_id]
            heapq.heapify(self._heap)

    def positions(self) -> dict[uuid.UUID, int]:
        """1-based position of every waiting run (1 = next to be solved)."""
        return {run_id: i + 1 for i, (_, run_id) in enumerate(sorted(self._heap))}

    async def get(self) -> uuid.UUID:
        """The oldest waiting run, waiting until there is one."""
        while not self._heap:
            self._changed.clear()
            await self._changed.wait()
        _, run_id = heapq.heappop(self._heap)
        self._queued.discard(run_id)
        return run_id
