"""The listener's wake-up: "a claim may find a run now".

A Realtime event or a catch-up scan says "this run looked PENDING"; that only wakes the work
loop, which then asks the database for *the next run* (`claim_run` without a run id). The
order is the database's (a round robin across organisations, planner_engine.claim_run), so N
listener replicas follow one order and no process keeps a line of its own that one tenant's
flood could fill. The hinted run ids are kept only to know whether a claim that found nothing
had been woken for a run (then the event may have outrun the insert's visibility).
"""

from __future__ import annotations

import asyncio
import uuid


class Wakeup:
    def __init__(self) -> None:
        self._hinted: set[uuid.UUID] = set()
        self._set = asyncio.Event()

    def hint(self, run_id: uuid.UUID) -> bool:
        """Wake the work loop for this run; returns False when it was already hinted since the
        last `take` (a duplicate event)."""
        new = run_id not in self._hinted
        self._hinted.add(run_id)
        self._set.set()
        return new

    def poke(self) -> None:
        """Wake the work loop without a run in mind (after a run ended: claim the next)."""
        self._set.set()

    def is_set(self) -> bool:
        return self._set.is_set()

    async def wait(self) -> None:
        await self._set.wait()

    def take(self) -> set[uuid.UUID]:
        """Consume the wake-up before claiming: a hint arriving during the claim wakes the
        loop again, so none is lost. Returns the runs hinted since the last call."""
        self._set.clear()
        hinted, self._hinted = self._hinted, set()
        return hinted
