"""The one back-off helper (listener/backoff.py): bounded, growing, jittered, resettable."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import uuid

import pytest
from loguru import logger

from listener.backoff import Backoff
from listener.logs import RunLogSink


def _delays(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_delays_stay_between_initial_and_cap() -> None:
    for seed in range(200):
        backoff = Backoff(0.5, 30.0, rng=random.Random(seed))
        for delay in _delays(backoff, 40):
            assert 0 < 0.5 <= delay <= 30.0


def test_delays_grow_step_by_step_until_the_cap() -> None:
    helpers = [Backoff(0.2, 5.0, rng=random.Random(seed)) for seed in range(500)]
    by_step = list(zip(*(_delays(b, 12) for b in helpers), strict=True))
    means = [statistics.fmean(step) for step in by_step]
    assert means[0] < means[1] < means[2] < means[3], means
    for n, step in enumerate(by_step):  # each delay at most three times the previous ceiling
        assert max(step) <= min(5.0, 0.2 * 3 ** (n + 1)) + 1e-9
    assert means[-1] > 5.0 / 2, "after many failures the delays sit near the cap"
    assert max(by_step[-1]) == 5.0


def test_two_helpers_do_not_retry_in_lockstep() -> None:
    a = _delays(Backoff(0.5, 30.0, rng=random.Random(1)), 10)
    b = _delays(Backoff(0.5, 30.0, rng=random.Random(2)), 10)
    assert all(x != y for x, y in zip(a, b, strict=True)), "every retry differs, the first too"
    # Without an explicit generator each helper seeds its own from the OS.
    firsts = {Backoff(0.5, 30.0).next_delay() for _ in range(20)}
    assert len(firsts) == 20


def test_the_generator_is_the_only_source_of_randomness() -> None:
    assert _delays(Backoff(0.5, 30.0, rng=random.Random(7)), 10) == _delays(
        Backoff(0.5, 30.0, rng=random.Random(7)), 10)


def test_reset_after_a_success_starts_again_from_initial() -> None:
    backoff = Backoff(1.0, 60.0, rng=random.Random(3))
    grown = _delays(backoff, 15)
    assert backoff.failures == 15 and grown[-1] > 3.0
    backoff.reset()
    assert backoff.failures == 0
    assert 1.0 <= backoff.next_delay() <= 3.0


def test_an_impossible_range_is_refused() -> None:
    with pytest.raises(ValueError, match="0 < initial_s <= cap_s"):
        Backoff(5.0, 1.0)
    with pytest.raises(ValueError, match="0 < initial_s <= cap_s"):
        Backoff(0.0, 1.0)


async def test_the_run_log_sink_backs_off_while_the_database_refuses() -> None:
    """Through an outage the flush loop retries ever less often (not every `interval_s`), and
    writes everything once the database is back."""
    attempts: list[float] = []
    written: list[dict[str, object]] = []
    down = True

    class FlakyDB:
        async def write_logs(self, items: list[dict[str, object]]) -> None:
            attempts.append(asyncio.get_running_loop().time())
            if down:
                raise OSError("connection refused")
            written.extend(items)

    sink = RunLogSink(interval_s=0.02)
    sink.install()
    try:
        with logger.contextualize(planner_run_id=str(uuid.uuid4()),
                                  organization_id=str(uuid.uuid4()),
                                  planner_lease=str(uuid.uuid4())):
            logger.info("a run's record")
    finally:
        sink.uninstall()
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(FlakyDB(), stop))  # type: ignore[arg-type]
    await asyncio.sleep(1.0)
    assert 2 <= len(attempts) < 20, f"{len(attempts)} attempts in 1 s at a 0.02 s interval"
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[-1] > 0.02 * 2, gaps
    down = False
    stop.set()
    await asyncio.wait_for(task, 5)
    assert [r["message"] for r in written] == ["a run's record"]
