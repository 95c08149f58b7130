"""Isolated, real PostgreSQL databases for tests.

The local stack's cluster holds one *template* database per version of the schema (its name
carries a hash of the scaffolding and migration files), built once with the same code path as
`planner dev up`. Each test module gets its own clone (`CREATE DATABASE ... TEMPLATE`), which
takes milliseconds, so tests never see each other's rows and can run in any order.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from devstack.settings import DevSettings
from devstack.stack import SCAFFOLDING_SQL, prepare_database
from listener.migrate import CRON_DATABASE_GUC, MIGRATIONS_DIR

_TEMPLATE_LOCK = 0x7465_6D70_6C61
#: The current definition of every object, one file per area, applied in name order.
SCHEMA_DIR = MIGRATIONS_DIR / "schema"


#: An organisation's own limits row ($1 = organisation id, $2 = runs per hour) with the queue
#: and the solver-seconds budgets out of reach: for tests and benchmarks whose subject is
#: not the limits. The sizes and the time cap stay the defaults'.
GENEROUS_LIMITS_SQL = (
    "insert into planner_engine.limits (organization_id, runs_per_hour, queued_runs,"
    " solver_seconds_per_hour, solver_seconds_per_day) values ($1, $2, 1000000, 1000000000,"
    " 1000000000) on conflict (organization_id) do update set"
    " runs_per_hour = excluded.runs_per_hour, queued_runs = excluded.queued_runs,"
    " solver_seconds_per_hour = excluded.solver_seconds_per_hour,"
    " solver_seconds_per_day = excluded.solver_seconds_per_day")
#: The same for every organisation of a test database, through the default row.
GENEROUS_DEFAULT_LIMITS_SQL = (
    "update planner_engine.limits set runs_per_hour = $1, queued_runs = 1000000,"
    " solver_seconds_per_hour = 1000000000, solver_seconds_per_day = 1000000000"
    " where tier = 'default'")


def schema_hash() -> str:
    h = hashlib.sha256(SCAFFOLDING_SQL.read_bytes())
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


async def ensure_template(settings: DevSettings) -> str:
    """Create the migrated template database for the current schema, once."""
    name = f"planner_tpl_{schema_hash()}"
    admin = await asyncpg.connect(settings.dsn())
    try:
        await admin.execute("select pg_advisory_lock($1)", _TEMPLATE_LOCK)
        try:
            exists = await admin.fetchval("select true from pg_database where datname = $1", name)
            if not exists:
                await admin.execute(f'create database "{name}_build"')
                try:
                    await prepare_database(settings.dsn(f"{name}_build"), settings)
                except BaseException:
                    await admin.execute(f'drop database if exists "{name}_build" with (force)')
                    raise
                await admin.execute(f'alter database "{name}_build" rename to "{name}"')
                # Its sweeper job was scheduled for the build name; clones get none.
                await unschedule_sweepers(admin, f"{name}_build")
                await admin.execute(f'alter database "{name}" is_template true')
                # Older templates are left from earlier schema versions; drop the idle ones.
                stale = await admin.fetch(
                    "select datname from pg_database where datname like 'planner_tpl_%' "
                    "and datname <> $1 and datname not like '%_build'",
                    name,
                )
                for row in stale:
                    try:
                        await admin.execute(f'alter database "{row[0]}" is_template false')
                        await admin.execute(f'drop database "{row[0]}"')
                    except asyncpg.PostgresError:
                        pass
        finally:
            await admin.execute("select pg_advisory_unlock($1)", _TEMPLATE_LOCK)
    finally:
        await admin.close()
    return name


def schema_files() -> list[Path]:
    return sorted(SCHEMA_DIR.glob("*.sql"))


async def create_from_schema_files(settings: DevSettings, prefix: str = "s") -> str:
    """A new database built the other way: the scaffolding, then migrations/schema/*.sql (no
    migration runner, no bookkeeping table). Returns its name; drop it with drop_database."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(settings.dsn())
    try:
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(settings.dsn(name))
    try:
        await conn.execute(SCAFFOLDING_SQL.read_text())
        # pg_cron runs only in the stack's database: the schema files leave the sweeper to it,
        # as `planner migrate --cron-database` does (40_access.sql).
        await conn.execute("select set_config($1, $2, false)", CRON_DATABASE_GUC,
                           settings.database)
        for path in schema_files():
            async with conn.transaction():
                await conn.execute(path.read_text(encoding="utf-8"))
    except BaseException:
        await conn.close()
        await drop_database(settings, name)
        raise
    await conn.close()
    return name


async def create_clone(settings: DevSettings, template: str, prefix: str = "t") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(settings.dsn())
    try:
        await admin.execute(f'create database "{name}" template "{template}"')
    finally:
        await admin.close()
    return name


async def unschedule_sweepers(admin: asyncpg.Connection, name: str) -> None:
    """Remove the pg_cron jobs scheduled from the stack's database (`admin`'s) for database
    `name`, and those of databases that no longer exist (left by an interrupted run), so
    scratch databases' sweepers do not pile up in the cron database."""
    await admin.execute(
        "select cron.unschedule(jobid) from cron.job j where j.database = $1"
        " or not exists (select from pg_database d where d.datname = j.database)", name)


async def drop_database(settings: DevSettings, name: str) -> None:
    admin = await asyncpg.connect(settings.dsn())
    try:
        await unschedule_sweepers(admin, name)
        await admin.execute(f'drop database if exists "{name}" with (force)')
    finally:
        await admin.close()


@asynccontextmanager
async def cloned_database(settings: DevSettings, prefix: str = "t") -> AsyncIterator[str]:
    """A fresh migrated database for the duration of the block; yields its name."""
    template = await ensure_template(settings)
    name = await create_clone(settings, template, prefix)
    try:
        yield name
    finally:
        await drop_database(settings, name)
