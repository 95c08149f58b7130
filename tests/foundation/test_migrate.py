"""The migration runner against real, empty PostgreSQL databases."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tomllib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from devstack.settings import REPO_ROOT, DevSettings
from listener import migrate
from listener.sqltext import split_statements, statements_match
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
        # The CLI's shape: one element per statement, trailing `;` and white space trimmed.
        assert rows[0]["statements"] == ["create table t (x int)", "insert into t values (1)"]
        assert rows[1]["statements"] == ["insert into t values (2)"]
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


async def test_cli_migrates_any_database(empty_db: str, dev_settings: DevSettings):
    """`planner migrate --database-url` applies the project's migrations to a bare database
    that has only what a hosted Supabase project has (the scaffolding). pg_cron runs in the
    stack's own database only, so the sweeper is scheduled from there (`--cron-database`)."""
    await scaffold(empty_db)
    planner = Path(sys.executable).with_name("planner")
    args = [str(planner), "migrate", "--database-url", empty_db,
            "--cron-database", dev_settings.database]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    n = len(migrate.discover())
    assert f"{n} migration(s) applied" in res.stdout
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 migration(s) applied" in again.stdout


# -- rows the Supabase CLI writes, and the CLI's view of this folder ------------------------

#: A file with what the CLI's splitter has to get right: comments before statements, quoted
#: and dollar-quoted semicolons, a BEGIN ATOMIC body, empty statements, no final `;`.
TRICKY_SQL = """-- a header comment
create table t (x int, note text default 'a;b');  /* block; comment */
insert into t (x, note) values (1, 'it''s; fine');
create function f() returns int language plpgsql as $body$
begin
  return 1;  -- not a cut
end
$body$;
create function g() returns int language sql
begin atomic
  select 1;
  select 2;
end;
;;
select count(*) from t
"""

#: What the CLI records for TRICKY_SQL, worked out by hand from its tokenizer's rules
#: (supabase/cli pkg/parser): each piece keeps the comments before it.
TRICKY_STATEMENTS = [
    "-- a header comment\ncreate table t (x int, note text default 'a;b')",
    "/* block; comment */\ninsert into t (x, note) values (1, 'it''s; fine')",
    "create function f() returns int language plpgsql as $body$\nbegin\n  return 1;  -- not a "
    "cut\nend\n$body$",
    "create function g() returns int language sql\nbegin atomic\n  select 1;\n  select 2;\nend",
    "select count(*) from t",
]


def test_statements_are_split_as_the_supabase_cli_splits_them():
    assert split_statements(TRICKY_SQL) == TRICKY_STATEMENTS
    # The CLI's quirks: a `)` closes every parenthesis, a backslash hides the next character,
    # a trailing comment is a statement of its own.
    assert split_statements("select ((1); 2") == ["select ((1)", "2"]
    assert split_statements("select \\; 1; -- end") == ["select \\; 1", "-- end"]
    assert split_statements("  \n;\n") == []


def test_normalised_text_ignores_comments_white_space_and_semicolons_only():
    assert statements_match(TRICKY_STATEMENTS, TRICKY_SQL)
    assert statements_match([TRICKY_SQL], TRICKY_SQL)  # the shape older runs wrote
    spaced = ["  create table t (x int,\n\tnote text default 'a;b') -- why",
              "insert into t (x, note) values (1, 'it''s; fine');;", *TRICKY_STATEMENTS[2:]]
    assert statements_match(spaced, TRICKY_SQL)
    # Changes inside quotes or to the code are changes.
    assert not statements_match(TRICKY_STATEMENTS, TRICKY_SQL.replace("'a;b'", "'a; b'"))
    assert not statements_match(TRICKY_STATEMENTS, TRICKY_SQL.replace("return 1;", "return 2;"))
    assert not statements_match(TRICKY_STATEMENTS, TRICKY_SQL.replace("x int", "x bigint"))
    assert not statements_match(TRICKY_STATEMENTS[:-1], TRICKY_SQL)


async def rewrite_statements(dsn: str, version: str, statements: list[str]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("update supabase_migrations.schema_migrations set statements = $2"
                           " where version = $1", version, statements)
    finally:
        await conn.close()


@pytest.mark.parametrize("shape", ["cli", "one_element", "cli_reformatted"])
async def test_rows_of_the_cli_and_of_older_runs_are_recognised(
    empty_db: str, tmp_path: Path, shape: str
):
    """A row as `supabase db push` writes it (split statements), as older versions of this
    runner wrote it (the whole file as one element), or split with other white space and
    comments, all count as the applied file; an edit of the file is still refused."""
    f = write(tmp_path, "20260101000001_tricky.sql", TRICKY_SQL)
    assert [m.name for m in await migrate.migrate(empty_db, tmp_path)] == ["tricky"]
    rows = {
        "cli": TRICKY_STATEMENTS,
        "one_element": [TRICKY_SQL],
        # Other comments and white space outside quoted text (dollar-quoted bodies are kept
        # exactly: an edit there is a change).
        "cli_reformatted": [
            "create   table t (x int,\n note text default 'a;b')  ",
            " ".join(TRICKY_STATEMENTS[1].split()),
            TRICKY_STATEMENTS[2],
            "/* reformatted */ " + " ".join(TRICKY_STATEMENTS[3].split()),
            TRICKY_STATEMENTS[4] + ";",
        ],
    }
    await rewrite_statements(empty_db, "20260101000001", rows[shape])
    write(tmp_path, "20260101000002_next.sql", "create table u (y int);")
    assert [m.name for m in await migrate.migrate(empty_db, tmp_path)] == ["next"]
    f.write_text(TRICKY_SQL.replace("return 1;", "return 2;"))
    with pytest.raises(migrate.MigrationError, match="changed after it was applied"):
        await migrate.migrate(empty_db, tmp_path)


async def test_project_migrations_are_recorded_as_the_cli_records_them(
    dev_settings: DevSettings, db_name: str
):
    conn = await asyncpg.connect(dev_settings.dsn(db_name))
    try:
        rows = {r["version"]: (r["name"], r["statements"]) for r in await conn.fetch(
            "select version, name, statements from supabase_migrations.schema_migrations")}
    finally:
        await conn.close()
    for mig in migrate.discover():
        assert rows[mig.version] == (mig.name, split_statements(mig.sql))


# The Supabase CLI's rule for a migration file (pkg/migration/file.go, list.go): a regular file
# directly in supabase/migrations named `<digits>_<name>.sql`; folders are skipped.
_CLI_MIGRATION_NAME = re.compile(r"^([0-9]+)_(.*)\.sql$")


def test_supabase_cli_layout_reads_exactly_our_migrations():
    """supabase/config.toml is valid for the CLI (the fields its Validate requires), and
    supabase/migrations is a link to migrations/, in which the CLI sees the same files as
    `planner migrate` (migrations/schema/ is a folder, which it skips)."""
    config = tomllib.loads((REPO_ROOT / "supabase" / "config.toml").read_text())
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", config["project_id"])
    assert config["db"]["major_version"] in (15, 17)
    link = REPO_ROOT / "supabase" / "migrations"
    assert link.is_symlink() and os.readlink(link) == "../migrations"
    assert link.resolve() == (REPO_ROOT / "migrations").resolve()
    cli_sees = sorted(p.name for p in link.iterdir()
                      if not p.is_dir() and _CLI_MIGRATION_NAME.match(p.name))
    skipped = sorted(p.name for p in link.iterdir()
                     if not p.is_dir() and not _CLI_MIGRATION_NAME.match(p.name))
    assert cli_sees == [m.path.name for m in migrate.discover()] and not skipped
    assert (link / "schema").is_dir()


# -- pg_cron is required ----------------------------------------------------------------------

async def scaffold(dsn: str) -> None:
    """What a hosted project has before our migrations (the local scaffolding)."""
    from devstack.stack import SCAFFOLDING_SQL

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCAFFOLDING_SQL.read_text())
    finally:
        await conn.close()


async def test_migrate_refuses_a_database_that_cannot_have_pg_cron(
    empty_db: str, dev_settings: DevSettings
):
    """A database of a server whose pg_cron runs in another database: one line naming the
    explicit setting, and the pg_cron migration is not recorded."""
    await scaffold(empty_db)
    planner = Path(sys.executable).with_name("planner")
    env = {k: v for k, v in os.environ.items() if k != "PLANNER_CRON_DATABASE"}
    res = subprocess.run([str(planner), "migrate", "--database-url", empty_db],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    line = one_error_line(res.stderr)
    assert "pg_cron runs only in database" in line
    assert f"--cron-database {dev_settings.database}" in line
    conn = await asyncpg.connect(empty_db)
    try:
        versions = await conn.fetch("select version from supabase_migrations.schema_migrations")
        assert "20261202000200" not in {r[0] for r in versions}
    finally:
        await conn.close()


async def test_cron_database_setting_schedules_the_sweeper_there_and_it_runs(
    empty_db: str, dev_settings: DevSettings
):
    """With --cron-database the sweeper is scheduled from the stack's database for this one,
    and pg_cron really runs it there (the schedule is per minute: this waits up to ~70 s).
    Dropping the database (tests/support/databases.drop_database) removes the job."""
    await scaffold(empty_db)
    name = empty_db.rsplit("/", 1)[1]
    planner = Path(sys.executable).with_name("planner")
    res = subprocess.run([str(planner), "migrate", "--database-url", empty_db,
                          "--cron-database", dev_settings.database],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cron = await asyncpg.connect(dev_settings.dsn())
    try:
        job = await cron.fetchrow("select jobid, jobname, command, database from cron.job"
                                  " where database = $1", name)
        assert job is not None
        assert job["jobname"] == f"{migrate.SWEEPER_JOB}@{name}"
        assert job["command"] == migrate.SWEEPER_COMMAND
        ran = None
        for _ in range(150):
            ran = await cron.fetchrow("select status, return_message from cron.job_run_details"
                                      " where jobid = $1 order by runid desc limit 1",
                                      job["jobid"])
            if ran is not None and ran["status"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.5)
        assert ran is not None, "pg_cron did not run the sweeper within 75 s"
        assert ran["status"] == "succeeded", ran["return_message"]
        # Again: the same job, replaced, not a second one.
        again = subprocess.run([str(planner), "migrate", "--database-url", empty_db,
                                "--cron-database", dev_settings.database],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert await cron.fetchval("select count(*) from cron.job where database = $1",
                                   name) == 1
        await drop_database(dev_settings, name)
        assert await cron.fetchval("select count(*) from cron.job where database = $1",
                                   name) == 0
    finally:
        await cron.close()


@pytest.mark.parametrize("mistake", ["missing privilege", "wrong password"])
def test_cli_mistakes_are_one_line(empty_db: str, dev_settings: DevSettings, mistake: str):
    """The likeliest `planner migrate` mistakes print one line naming the fix: the listener's
    role instead of the database owner's, and a wrong password. Nothing is applied."""
    from urllib.parse import urlsplit, urlunsplit

    url = urlsplit(empty_db)
    user, password = ((dev_settings.engine_role, dev_settings.engine_password)
                      if mistake == "missing privilege" else ("postgres", "wrong"))
    dsn = urlunsplit(url._replace(netloc=f"{user}:{password}@{url.hostname}:{url.port}"))
    planner = Path(sys.executable).with_name("planner")
    res = subprocess.run([str(planner), "migrate", "--database-url", dsn],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    line = one_error_line(res.stderr)
    expected = ("lacks a privilege", "use the database owner's role") \
        if mistake == "missing privilege" else ("refused the password", "fix the password")
    assert all(text in line for text in expected), line
