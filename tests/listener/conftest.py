"""End-to-end fixtures: a module database with seeded organisations, its own Realtime server,
and real `planner listen` subprocesses started per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest

from devstack.seed import SeededOrganization, seed_organization
from devstack.settings import DevSettings
from tests.support.databases import GENEROUS_DEFAULT_LIMITS_SQL
from tests.support.harness import ListenerProcess, listener_env, stop_all
from tests.support.realtime import RealtimeServer

#: Small but real: 5 terms, VIC_PGY1, solved in about a second with a 1 s time limit.
SMALL = {"lines": 24, "terms": 5, "teams": 24, "rule_sets": ["VIC_PGY1"]}
#: Large enough that the search is still running seconds later (for mid-solve faults).
LARGE = {"lines": 250, "terms": 5, "teams": 80, "rule_sets": ["VIC_PGY1"]}


@pytest.fixture(scope="module")
async def orgs(dev_settings: DevSettings, db_url: str) -> list[SeededOrganization]:
    """Twelve small organisations and one large one (the last)."""
    conn = await asyncpg.connect(db_url)
    try:
        made = [
            await seed_organization(conn, dev_settings, f"Health {i}", instance_seed=i, **SMALL)
            for i in range(12)
        ]
        made.append(await seed_organization(conn, dev_settings, "Big Health", instance_seed=99,
                                            **LARGE))
        # Tests insert many runs; the hourly Denial-of-Wallet limit has its own tests.
        await conn.execute(GENEROUS_DEFAULT_LIMITS_SQL, 10000)
        return made
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def org(
    request: pytest.FixtureRequest, dev_settings: DevSettings, db_url: str
) -> SeededOrganization:
    """One small organisation of the module's own (named after the module; its instance seed
    is the module's ORG_SEED, 7 by default), for modules that need no more than one."""
    module = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    conn = await asyncpg.connect(db_url)
    try:
        return await seed_organization(conn, dev_settings, f"{module} Health",
                                       instance_seed=getattr(request.module, "ORG_SEED", 7),
                                       **SMALL)
    finally:
        await conn.close()


ListenerFactory = Callable[..., ListenerProcess]


@pytest.fixture
def listeners(
    dev_settings: DevSettings, db_name: str, rt_server: RealtimeServer, tmp_path: Path,
) -> Iterator[ListenerFactory]:
    """Start listeners with `listeners(name, **env_overrides)`; all stopped at teardown."""
    made: list[ListenerProcess] = []

    def start(name: str = "L1", **overrides: str | float | int) -> ListenerProcess:
        env = listener_env(dev_settings, db_name, rt_server.url, **overrides)
        proc = ListenerProcess(env, tmp_path / f"{name}.log", worker_id=name).start()
        made.append(proc)
        return proc

    yield start
    stop_all(made)
