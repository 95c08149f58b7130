"""The migration runner against real, empty PostgreSQL databases."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from devstack.settings import DevSettings
from listener import migrate
from tests.support.databases import drop_database


@pytest.fixture
async def empty_db(dev_settings: DevSettings) -> AsyncIterator[str]:
    name = f"m_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dev_settings.dsn())
    await admin.execute(f'create database "{name}"')
    await admin.close()
    yield dev_settings.dsn(name)
    await drop_database(dev_settings, name)


def write(d: Path, name: str, sql: str) -> Path:
    p = d / name
    p.write_text(sql)
    return p


async def test_applies_in_order_and_records_like_supabase_cli(empty_db: str, tmp_path: Path):
    write(tmp_path, "20260101000002_second.sql", "insert into t values (2);")
    write(tmp_path, "20260101000001_first.sql", "create table t (x int); insert into t values (1);")
    done = await migrate.migrate(empty_db, tmp_path)
    assert [m.name for m in done] == ["first", "second"]
    conn = await asyncpg.connect(empty_db)
    try:
        rows = await conn.fetch(
            "select version, name, statements from supabase_migrations.schema_migrations "
            "order by version"
        )
        assert [(r["version"], r["name"]) for r in rows] == [
            ("20260101000001", "first"),
            ("20260101000002", "second"),
        ]
        assert rows[0]["statements"] == ["create table t (x int); insert into t values (1);"]
        assert await conn.fetchval("select array_agg(x order by x) from t") == [1, 2]
    finally:
        await conn.close()
    # A second run is a no-op.
    assert await migrate.migrate(empty_db, tmp_path) == []


async def test_refuses_when_an_applied_file_changed(empty_db: str, tmp_path: Path):
    f = write(tmp_path, "20260101000001_first.sql", "create table t (x int);")
    await migrate.migrate(empty_db, tmp_path)
    f.write_text("create table t (x bigint);")
    write(tmp_path, "20260101000002_second.sql", "create table u (y int);")
    with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
        await migrate.migrate(empty_db, tmp_path)
    conn = await asyncpg.connect(empty_db)
    try:
        # Nothing after the refusal was applied.
        assert await conn.fetchval("select to_regclass('public.u')") is None
    finally:
        await conn.close()


async def test_failing_migration_rolls_back_whole_and_keeps_earlier(empty_db: str, tmp_path: Path):
    write(tmp_path, "20260101000001_ok.sql", "create table good (x int);")
    write(
        tmp_path,
        "20260101000002_bad.sql",
        "create table half (x int); insert into half values (1); select 1/0;",
    )
    write(tmp_path, "20260101000003_later.sql", "create table later (x int);")
    with pytest.raises(migrate.MigrationError, match=r"20260101000002_bad\.sql failed"):
        await migrate.migrate(empty_db, tmp_path)
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("select to_regclass('public.good')") is not None
        assert await conn.fetchval("select to_regclass('public.half')") is None
        assert await conn.fetchval("select to_regclass('public.later')") is None
        versions = await conn.fetch("select version from supabase_migrations.schema_migrations")
        assert [r[0] for r in versions] == ["20260101000001"]
    finally:
        await conn.close()


def test_misnamed_file_is_an_error(tmp_path: Path):
    write(tmp_path, "001_nope.sql", "select 1;")
    with pytest.raises(migrate.MigrationError, match="14-digit timestamp"):
        migrate.discover(tmp_path)


def test_project_migrations_are_well_named():
    found = migrate.discover()
    assert found, "migrations/ holds the schema"
    assert [m.version for m in found] == sorted(m.version for m in found)
    # One baseline (the squash of issue 11), later changes after it.
    assert found[0].name == "baseline"
    assert not {m.version for m in found} & migrate.SQUASHED_VERSIONS


def test_schema_files_are_not_migrations(tmp_path: Path):
    """migrations/schema/ (the current definitions) is never applied by the runner, and its
    files, which are not named like migrations, do not make discover() fail."""
    assert (migrate.MIGRATIONS_DIR / "schema" / "10_tables.sql").is_file()
    assert all(m.path.parent == migrate.MIGRATIONS_DIR for m in migrate.discover())
    write(tmp_path, "20260101000001_first.sql", "select 1;")
    (tmp_path / "schema").mkdir()
    write(tmp_path / "schema", "10_tables.sql", "select 1/0;")
    assert [m.name for m in migrate.discover(tmp_path)] == ["first"]


async def record_versions(dsn: str, versions: list[str]) -> None:
    """Make `dsn` look migrated by other files: its bookkeeping lists `versions`."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(migrate.BOOKKEEPING_SQL)
        await conn.executemany(
            "insert into supabase_migrations.schema_migrations (version, statements, name)"
            " values ($1, $2, $3)", [(v, ["select 1;"], "old") for v in versions])
    finally:
        await conn.close()


def one_error_line(stderr: str) -> str:
    """The single `error: ...` line a refused command prints (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


async def test_a_database_migrated_before_the_squash_is_told_to_reset(empty_db: str):
    await record_versions(empty_db, sorted(migrate.SQUASHED_VERSIONS))
    with pytest.raises(migrate.MigrationError) as refused:
        await migrate.migrate(empty_db)
    message = str(refused.value)
    assert "\n" not in message and "squashed" in message and "`planner dev reset`" in message
    conn = await asyncpg.connect(empty_db)
    try:  # refused before anything ran
        assert await conn.fetchval("select to_regnamespace('planner_engine')") is None
    finally:
        await conn.close()
    planner = Path(sys.executable).with_name("planner")
    res = subprocess.run([str(planner), "migrate", "--database-url", empty_db],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "planner dev reset" in one_error_line(res.stderr)


async def test_dev_up_on_a_database_migrated_before_the_squash_says_reset(
    dev_settings: DevSettings,
):
    """`planner dev up` on a stack whose database records the old versions stops with the same
    one line. The developer's own stack database is used, its two extra bookkeeping rows
    removed afterwards: pointing `dev up` at another database (PLANNER_DEV_DATABASE) would
    move pg_cron's `cron.database_name` and restart the shared cluster (seen in CI: it broke
    the pg_cron test that ran after it)."""
    old = ["20261128000000", "20261128000100"]
    dsn = dev_settings.dsn()
    await record_versions(dsn, old)
    try:
        planner = Path(sys.executable).with_name("planner")
        res = subprocess.run([str(planner), "dev", "up"], capture_output=True, text=True,
                             timeout=300)
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("delete from supabase_migrations.schema_migrations"
                               " where version = any($1::text[])", old)
        finally:
            await conn.close()
    assert res.returncode == 1, res.stdout + res.stderr
    line = one_error_line(res.stderr)
    assert "squashed" in line and "`planner dev reset`" in line


async def test_versions_from_another_checkout_are_refused(empty_db: str, tmp_path: Path):
    write(tmp_path, "20260101000001_first.sql", "create table t (x int);")
    await record_versions(empty_db, ["20990101000000"])
    with pytest.raises(migrate.MigrationError, match="another checkout"):
        await migrate.migrate(empty_db, tmp_path)
    conn = await asyncpg.connect(empty_db)
    try:
        assert await conn.fetchval("select to_regclass('public.t')") is None
    finally:
        await conn.close()


async def test_cli_migrates_any_database(empty_db: str, tmp_path: Path):
    """`planner migrate --database-url` applies the project's migrations to a bare database
    that has only what a hosted Supabase project has (the scaffolding)."""
    from devstack.stack import SCAFFOLDING_SQL

    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute(SCAFFOLDING_SQL.read_text())
    finally:
        await conn.close()
    planner = Path(sys.executable).with_name("planner")
    res = subprocess.run(
        [str(planner), "migrate", "--database-url", empty_db],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    n = len(migrate.discover())
    assert f"{n} migration(s) applied" in res.stdout
    again = subprocess.run(
        [str(planner), "migrate", "--database-url", empty_db],
        capture_output=True, text=True, timeout=120,
    )
    assert again.returncode == 0 and "0 migration(s) applied" in again.stdout
