"""The fault campaign's short version, in `make test`: every scenario but QUICK_SKIP (s8, the
giant problem: its figure comes from bench/flood_bench.py), QUICK_REPS repetitions,
on a throw-away stack of its own (it restarts PostgreSQL; the developer stack is not touched).

Scenario 1 is driven by pg_cron only (one-minute ticks, 5 s TTL), so this file also proves
once per CI run that the real cron job rescues a killed listener's run. The full campaign is
`make chaos` (figures in docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from tests.chaos.campaign import (
    QUICK_REPS,
    QUICK_SKIP,
    SCENARIOS,
    Campaign,
    ChaosStack,
    Result,
)

pytestmark = [pytest.mark.timeout(300), pytest.mark.stack]


@pytest.fixture(scope="module")
async def campaign() -> AsyncIterator[Campaign]:
    chaos = ChaosStack(int(os.environ.get("PLANNER_CHAOS_PG_PORT", "54349")),
                       int(os.environ.get("PLANNER_CHAOS_REALTIME_PORT", "54350")))
    try:
        c = Campaign(chaos, seed=11)
        await c.setup()
        yield c
        await c.db.close()
    finally:
        await asyncio.to_thread(chaos.down)


@pytest.mark.parametrize("key", [k for k in SCENARIOS if k not in QUICK_SKIP])
async def test_scenario_loses_nothing(campaign: Campaign, key: str) -> None:
    res: Result = await campaign.run(key, QUICK_REPS)
    print(res.row(), "\n", "; ".join(res.notes))
    assert res.inserted >= QUICK_REPS
    assert res.stuck == 0 and res.lost == 0
    assert res.duplicate_commits == 0 and res.cross_org_writes == 0
    assert sum(res.outcomes.values()) == res.inserted
    assert res.violations == [], res.violations
