"""One back-off for every reconnect and retry loop: exponential growth, jitter, a cap, reset.

Why jitter: when a shared dependency (the database, the Realtime server) restarts, every
listener replica loses it at the same instant. With plain doubling they all retry at the same
instants too, and keep hammering it in lockstep. Each `Backoff` draws its delays from its own
random generator (seeded from the OS), so replicas spread out from the first retry.

The delays are "decorrelated jitter" (AWS Architecture Blog, "Exponential Backoff And
Jitter"): each delay is uniform between `initial_s` and three times the previous one, capped at
`cap_s`. Unlike "full jitter" (uniform between 0 and the ceiling) it never retries sooner than
`initial_s`, which matters for loops whose normal cadence is `initial_s` (the run-log flush):
an outage must not make them retry faster than they run when healthy.

Why not a library such as `stamina`: it wraps a call and retries on exceptions, with attempt
and time budgets. Our loops are different in shape: they run forever, wait on a stop event
(or a wake pipe, in a thread) rather than sleeping, log the delay before they wait, and decide
themselves what counts as success (a subscription that came up, a flush that went through).
They only need the next delay; this class is that and nothing else, usable from threads and
event loops alike. It is not thread-safe: one loop owns one instance.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for one retry loop: call `next_delay()` after a failure, `reset()` after a success."""

    def __init__(self, initial_s: float, cap_s: float, *, rng: random.Random | None = None) -> None:
        if not 0 < initial_s <= cap_s:
            raise ValueError(f"back-off needs 0 < initial_s <= cap_s (got {initial_s}, {cap_s})")
        self.initial_s = initial_s
        self.cap_s = cap_s
        # A generator of its own, seeded from os.urandom: no two processes share a sequence.
        self._rng = rng if rng is not None else random.Random()
        self._previous = initial_s
        self.failures = 0

    def next_delay(self) -> float:
        """How long to wait before the next attempt, in [initial_s, cap_s]; grows on average."""
        delay = min(self.cap_s, self._rng.uniform(self.initial_s, self._previous * 3))
        self._previous = delay
        self.failures += 1
        return delay

    def reset(self) -> None:
        """After a success: the next failure starts again from `initial_s`."""
        self._previous = self.initial_s
        self.failures = 0
