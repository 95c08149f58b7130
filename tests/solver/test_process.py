"""The child-process contract the listener relies on: results, progress, stop, memory, crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from solver import (
    Plan,
    Progress,
    SolverCrashed,
    SolverOutOfMemory,
    SolverProcessError,
    SpareChild,
    start_solve,
    validate_plan,
)
from tests.solver.helpers import small_generated


async def test_result_and_progress_concurrently_without_blocking_the_loop() -> None:
    p = small_generated(["VIC_PGY1"], lines=14)
    handle = start_solve(p, num_workers=1)
    assert handle.pid > 0 and handle.pid != os.getpid()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def collect() -> list[Progress]:
        return [p async for p in handle.progress()]

    tick = asyncio.create_task(ticker())
    seen_task = asyncio.create_task(collect())
    plan = await handle.result()
    seen = await seen_task
    tick.cancel()
    assert plan.status == "OPTIMAL"
    assert validate_plan(p, plan) == []
    assert plan.peak_memory_mb is not None and plan.peak_memory_mb > 10
    assert seen and seen[-1].objective == plan.objective
    assert ticks > 20  # the loop kept running while the child solved
    assert await handle.result() == plan  # idempotent


async def test_stop_returns_best_plan_so_far() -> None:
    p = small_generated(["VIC_PGY1"], lines=150, teams=70)
    handle = start_solve(p, time_limit_s=120, num_workers=2)
    started = time.monotonic()
    async for progress in handle.progress():
        if progress.solutions:
            handle.stop()
            break
    plan = await handle.result()
    assert time.monotonic() - started < 30
    assert plan.status in ("FEASIBLE", "OPTIMAL")
    assert len(plan.lines) == 150
    assert validate_plan(p, plan) == []


async def test_stop_before_anything_found_is_unknown() -> None:
    handle = start_solve(small_generated(["VIC_PGY1"]))
    handle.stop()  # most likely still importing
    plan = await handle.result()
    assert plan.status in ("UNKNOWN", "FEASIBLE", "OPTIMAL")
    if plan.status == "UNKNOWN":
        assert plan.lines == []


async def test_tiny_memory_cap_is_a_clean_error() -> None:
    handle = start_solve(small_generated(["VIC_PGY1"]), memory_limit_mb=1)
    with pytest.raises(SolverOutOfMemory, match="below the solver's baseline"):
        await asyncio.wait_for(handle.result(), 30)


async def test_memory_cap_hit_while_solving_is_a_clean_error() -> None:
    p = small_generated(["VIC_PGY1"], lines=250, teams=80)
    handle = start_solve(p, memory_limit_mb=360, num_workers=2)
    with pytest.raises(SolverOutOfMemory) as info:
        await asyncio.wait_for(handle.result(), 60)
    assert isinstance(info.value, SolverProcessError)
    assert "360 MiB" in str(info.value) or "memory" in str(info.value)


async def test_crash_in_child_is_a_clean_error() -> None:
    handle = start_solve(small_generated(["VIC_PGY1"], lines=200, teams=70), num_workers=2)
    async for _ in handle.progress():
        os.kill(handle.pid, signal.SIGSEGV)
        break
    with pytest.raises(SolverCrashed, match="SIGSEGV") as info:
        await asyncio.wait_for(handle.result(), 30)
    assert "\n" not in str(info.value)


async def test_kill() -> None:
    handle = start_solve(small_generated(["VIC_PGY1"], lines=200, teams=70), num_workers=2)
    handle.kill()
    with pytest.raises(SolverCrashed, match="killed on request"):
        await asyncio.wait_for(handle.result(), 30)


def test_blocking_wait_for_scripts() -> None:
    handle = start_solve(small_generated(["VIC_PGY2", "NO_NIGHTS"]), num_workers=1)
    plan = handle.wait(60)
    assert isinstance(plan, Plan) and plan.status == "OPTIMAL"
    assert handle.done


async def test_spare_child_is_used_then_refilled_and_closed() -> None:
    """The listener keeps a pre-started child; a solve takes it instead of spawning."""
    spare = SpareChild()
    spare.refill()
    first = spare.pid
    assert first is not None
    spare.refill()
    assert spare.pid == first, "refill keeps a live spare"
    p = small_generated(["VIC_PGY1"], lines=14)
    handle = start_solve(p, num_workers=1, spare=spare)
    assert handle.pid == first and spare.pid is None
    plan = await handle.result()
    assert plan.status in ("OPTIMAL", "FEASIBLE") and validate_plan(p, plan) == []
    spare.refill()
    second = spare.pid
    assert second is not None and second != first
    spare.close()
    assert spare.pid is None
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # the spare exits on stdin EOF; wait() reaped it in close()
            os.kill(second, 0)
            time.sleep(0.05)
