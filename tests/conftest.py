"""Fixtures: the real local stack, and one cloned, migrated database per test module."""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from hypothesis import settings as hypothesis_settings

from devstack import stack
from devstack.settings import DevSettings
from tests.support.databases import cloned_database
from tests.support.realtime import RealtimeServer

# Property tests explore new random examples on developers' machines; in CI (CI=true) they
# replay a fixed sequence, so a landing never depends on the luck of the draw.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


#: Modules that use the stack's *own* database (not a clone): pg_cron lives only there, the
#: demo seeds it, and one migrate test records old versions in it for a moment (a `dev up`
#: meanwhile would refuse). Under pytest-xdist they form one group, run one after the other by
#: one worker; every other module is a group of its own, so module-scoped fixtures (the cloned
#: database, the Realtime server, the chaos stack on its fixed ports) are set up exactly once.
SHARED_STACK_DATABASE = frozenset({
    "tests/db/test_engine.py",
    "tests/db/test_seed.py",
    "tests/foundation/test_migrate.py",
    "tests/foundation/test_scaffolding.py",
    "tests/listener/test_ops_and_demo.py",
})

#: The longest groups, handed out first so that the two workers finish together (from
#: `pytest --durations=0`: the quick fault campaign ~230 s, the listener's end-to-end tests
#: ~150 s, the shared-database group ~120 s, the side-stack and solver-child tests ~50 s each).
#: Order only changes how long `make test` takes, never what it checks.
LONG_FIRST = (
    "tests/chaos/test_campaign_quick.py",
    "tests/listener/test_end_to_end.py",
    "shared-stack-database",
    "tests/foundation/test_devstack.py",
    "tests/solver/test_process.py",
)


def xdist_group(nodeid: str) -> str:
    """The unit one pytest-xdist worker runs whole: the test's module, or the shared group."""
    module = nodeid.split("::", 1)[0]
    return "shared-stack-database" if module in SHARED_STACK_DATABASE else module


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the real local stack `stack` (it asks for `dev_settings`,
    directly or through another fixture, or its module is marked), so `make test-fast` can
    leave them out: `pytest -m "not stack"`. Nothing is ever skipped: `make test` runs all.
    Then put the LONG_FIRST groups first (a stable sort: the rest keep their order)."""
    for item in items:
        if "dev_settings" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stack)
    rank = {group: i for i, group in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(xdist_group(item.nodeid), len(rank)))


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`make test` runs `pytest -n 2`: each worker takes a whole group (xdist_group) at a
    time, in collection order. (xdist's own `--dist loadgroup` marks tests by rewriting their
    node ids, which pytest 9.2 no longer allows, so the grouping is done here.)"""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    config.option.loadscopereorder = False  # keep LONG_FIRST's order
    return GroupScheduling(config, log)


@pytest.fixture(scope="session")
def dev_settings() -> Iterator[DevSettings]:
    """The developer's local stack, started if needed (and left running, like `make up`).
    Under pytest-xdist every worker process asks; a file lock lets one start it at a time."""
    settings = DevSettings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.state_dir / "tests-up.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            settings = stack.up(settings)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    yield settings


@pytest.fixture(scope="module")
async def db_name(dev_settings: DevSettings) -> AsyncIterator[str]:
    """A database of this module's own, cloned from the migrated template."""
    async with cloned_database(dev_settings) as name:
        yield name


@pytest.fixture(scope="module")
def db_url(dev_settings: DevSettings, db_name: str) -> str:
    """Superuser DSN of the module's database."""
    return dev_settings.dsn(db_name)


@pytest.fixture(scope="module")
def engine_url(dev_settings: DevSettings, db_name: str) -> str:
    """The listener's least-privilege role on the module's database."""
    return dev_settings.engine_dsn(db_name)


@pytest.fixture(scope="module")
def rt_server(dev_settings: DevSettings, db_name: str) -> Iterator[RealtimeServer]:
    """The local Realtime server for this module's database (tests/realtime overrides it)."""
    with RealtimeServer(dev_settings, db_name) as server:
        yield server


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the module's database (the end-to-end tests' name for it)."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def pg(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the module's database."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()
