"""The schema files and the migrations describe the same database.

migrations/schema/*.sql hold the current definition of every object, once; the migrations are
how a database gets there (the baseline, then deltas). A change made to one and not the other
shows up here as a difference between the two `pg_dump --schema-only` outputs.
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from collections.abc import AsyncIterator

import asyncpg
import pytest

from devstack.settings import DevSettings
from listener.migrate import MIGRATIONS_DIR
from tests.support.databases import create_from_schema_files, drop_database, schema_files

# pg_dump 15.14+ brackets its output with `\restrict <random key>` / `\unrestrict <key>`; the
# key differs on every run, nothing else does.
_RESTRICT = re.compile(r"^\\(un)?restrict \S+$", re.MULTILINE)
# The migration runner's bookkeeping, which only the migrated database has.
_BOOKKEEPING_SCHEMA = "supabase_migrations"
# The rows the schema itself inserts (the limits, the rule-set catalogue). When the sweeper
# was scheduled is a fact about the database, not the schema.
_REFERENCE_ROWS = (
    "select to_jsonb(s) - 'sweeper_scheduled_at' from planner_engine.settings s",
    "select jsonb_agg(jsonb_build_object('code', code, 'description', description)"
    " order by code) from public.planner_rule_sets",
)


def schema_dump(settings: DevSettings, database: str) -> str:
    """`pg_dump --schema-only` of `database`, the random restrict key taken out."""
    res = subprocess.run(
        [str(settings.pg_bindir / "pg_dump"), "--schema-only",
         f"--exclude-schema={_BOOKKEEPING_SCHEMA}",
         "-h", settings.host, "-p", str(settings.pg_port), "-U", settings.superuser, database],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PGPASSWORD": settings.superuser_password},
    )
    assert res.returncode == 0, res.stderr
    return _RESTRICT.sub(r"\\\1restrict KEY", res.stdout)


@pytest.fixture(scope="module")
async def from_schema_files(dev_settings: DevSettings) -> AsyncIterator[str]:
    name = await create_from_schema_files(dev_settings)
    try:
        yield name
    finally:
        await drop_database(dev_settings, name)


async def test_schema_files_and_migrations_build_the_same_database(
    dev_settings: DevSettings, db_name: str, from_schema_files: str
):
    migrated = schema_dump(dev_settings, db_name)
    built = schema_dump(dev_settings, from_schema_files)
    assert "CREATE FUNCTION planner_engine.commit_plan" in migrated  # a real dump, not empty
    diff = "\n".join(difflib.unified_diff(
        migrated.splitlines(), built.splitlines(), "from migrations", "from schema files",
        lineterm="", n=2))
    assert not diff, (
        "migrations/schema/*.sql and the migrations differ; a schema change goes into both "
        "(a new migration, and the definition in its schema file):\n" + diff[:6000])
    for query in _REFERENCE_ROWS:
        rows = []
        for database in (db_name, from_schema_files):
            conn = await asyncpg.connect(dev_settings.dsn(database))
            try:
                rows.append(await conn.fetchval(query))
            finally:
                await conn.close()
        assert rows[0] == rows[1] and rows[0] is not None, query


def test_each_definition_is_in_the_schema_files_once():
    """No `create or replace` piling a new body over an old one, and no function or table
    defined in two places: the schema files are where a reader finds THE definition."""
    text = {p.name: p.read_text(encoding="utf-8") for p in schema_files()}
    assert sorted(text) == ["10_tables.sql", "20_rules.sql", "30_engine.sql", "40_access.sql"]
    definitions: dict[str, list[str]] = {}
    pattern = re.compile(r"^create (or replace )?(function|table|view|trigger|policy) "
                         r"([\w.]+)(?: on ([\w.]+))?", re.IGNORECASE | re.MULTILINE)
    for name, sql in text.items():
        for m in pattern.finditer(sql):
            assert not m[1], f"{name}: `create or replace {m[2]} {m[3]}`; edit the definition"
            key = f"{m[2].lower()} {m[3]}" + (f" on {m[4]}" if m[4] else "")
            definitions.setdefault(key, []).append(name)
    twice = {k: v for k, v in definitions.items() if len(v) > 1}
    assert not twice, f"defined more than once: {twice}"
    assert "function planner_engine.commit_plan" in definitions
    assert "table public.rotations" in definitions


def test_sql_refers_to_nothing_outside_the_repository():
    for path in [*MIGRATIONS_DIR.glob("*.sql"), *schema_files()]:
        sql = path.read_text(encoding="utf-8")
        assert not re.search(r"(?<![\w.])/(work|home|tmp|root)/", sql), path.name
