"""Fixtures for the attack and property tests: a module database on the developer stack with
two seeded organisations, its own Realtime server, and real `planner listen` subprocesses.

(The fault campaign itself does not use these: it needs a whole stack of its own because it
restarts PostgreSQL; see tests/chaos/campaign.py.)
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest

from devstack.seed import SeededOrganization, seed_organization
from devstack.settings import DevSettings
from tests.support.databases import GENEROUS_DEFAULT_LIMITS_SQL
from tests.support.harness import ListenerProcess, listener_env
from tests.support.realtime import RealtimeServer

SMALL = {"lines": 24, "terms": 5, "teams": 24, "rule_sets": ["VIC_PGY1"]}


@pytest.fixture(scope="module")
async def orgs(dev_settings: DevSettings, db_url: str) -> list[SeededOrganization]:
    """Organisations A and B (small instances; runs solve in about their 1 s time limit)."""
    conn = await asyncpg.connect(db_url)
    try:
        made = [await seed_organization(conn, dev_settings, f"Attack {n}", instance_seed=i,
                                        **SMALL)  # type: ignore[arg-type]
                for i, n in enumerate("AB")]
        await conn.execute(GENEROUS_DEFAULT_LIMITS_SQL, 100000)
        # every run solves for 2 s at most (the cap is the database's: planner_engine.limits)
        await conn.execute("update planner_engine.limits set max_time_limit_s = 2"
                           " where tier = 'default'")
        return made
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def listener(
    dev_settings: DevSettings, db_name: str, rt_server: RealtimeServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ListenerProcess]:
    """One real listener for the whole module (attacks must not need a restart)."""
    env = listener_env(dev_settings, db_name, rt_server.url)
    proc = ListenerProcess(env, tmp_path_factory.mktemp("listener") / "L.log",
                           worker_id="attack-L").start()
    yield proc
    proc.stop_now()
