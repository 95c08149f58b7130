"""Fixtures: the real local stack, and one cloned, migrated database per test module."""

from __future__ import annotations

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the real local stack `stack` (it asks for `dev_settings`,
    directly or through another fixture, or its module is marked), so `make test-fast` can
    leave them out: `pytest -m "not stack"`. Nothing is ever skipped: `make test` runs all."""
    for item in items:
        if "dev_settings" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def dev_settings() -> Iterator[DevSettings]:
    """The developer's local stack, started if needed (and left running, like `make up`)."""
    settings = stack.up()
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
