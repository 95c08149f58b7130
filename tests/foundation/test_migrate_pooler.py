"""`planner migrate` refuses a transaction-mode pooler and works through a session-mode one.

A real PgBouncer (Debian's `pgbouncer`, one of the packages `planner dev packages` installs;
tests/support/pgbouncer.py)
runs in front of the stack's PostgreSQL, as the unprivileged OS user when we are root
(PgBouncer refuses to run as root), on a free port.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest

from devstack.settings import DevSettings
from listener import migrate
from tests.foundation.test_migrate import one_error_line, scaffold
from tests.support.databases import cloned_database, drop_database
from tests.support.pgbouncer import PgBouncer


@contextmanager
def pgbouncer(settings: DevSettings, database: str, mode: str) -> Iterator[str]:
    """A PgBouncer in `mode` for `database` (and any other database of the stack, such as the
    cron database); yields the superuser's DSN of `database` through it."""
    with PgBouncer(settings, database, pool_mode=mode, pool_size=4, any_database=True) as pb:
        yield pb.dsn(settings.superuser, settings.superuser_password)


@pytest.fixture
async def bare_db(dev_settings: DevSettings) -> str:
    """A database with only the Supabase scaffolding (as a fresh hosted project)."""
    async with cloned_database(dev_settings, prefix="p") as _:
        pass  # (only to build the template once; the test needs an unmigrated database)
    name = f"p_{os.urandom(6).hex()}"
    admin = await asyncpg.connect(dev_settings.dsn())
    try:
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    await scaffold(dev_settings.dsn(name))
    return name


async def test_migrate_refuses_a_transaction_pooler_and_applies_nothing(
    dev_settings: DevSettings, bare_db: str
):
    try:
        with pgbouncer(dev_settings, bare_db, "transaction") as dsn:
            with pytest.raises(migrate.MigrationError, match="pooler in transaction mode"):
                await migrate.migrate(dsn, cron_database=dev_settings.database)
            planner = Path(sys.executable).with_name("planner")
            res = subprocess.run(
                [str(planner), "migrate", "--database-url", dsn,
                 "--cron-database", dev_settings.database],
                capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, res.stdout + res.stderr
        line = one_error_line(res.stderr)
        assert "transaction mode" in line and "session pooler" in line and "direct" in line
        conn = await asyncpg.connect(dev_settings.dsn(bare_db))
        try:  # refused before anything ran
            assert await conn.fetchval("select to_regnamespace('planner_engine')") is None
        finally:
            await conn.close()
    finally:
        await drop_database(dev_settings, bare_db)


async def test_migrate_works_through_a_session_pooler(
    dev_settings: DevSettings, bare_db: str
):
    try:
        with pgbouncer(dev_settings, bare_db, "session") as dsn:
            done = await migrate.migrate(dsn, cron_database=dev_settings.database)
        assert [m.version for m in done] == [m.version for m in migrate.discover()]
    finally:
        await drop_database(dev_settings, bare_db)
