"""Apply `migrations/*.sql` to any PostgreSQL database, hosted Supabase included.

Each file `migrations/<14-digit timestamp>_<name>.sql` runs in its own transaction and is
recorded in `supabase_migrations.schema_migrations` (version, name, statements), the table the
Supabase CLI keeps, so a team can switch between this runner and `supabase db push`
(`supabase/migrations` is a link to `migrations/`). `statements` holds the file cut into
statements exactly as the CLI cuts it (listener/sqltext.py); a later run compares the row with
the file ignoring comments, white space and statement-ending semicolons, so rows of either tool
(and the whole-file rows older versions of this runner wrote) match their file, and refuses to
continue when an applied file was edited, because silently diverging schemas are worse than a
loud stop. A failing file is rolled back whole; files before it stay recorded.

pg_cron is required (the sweeper): the migration that schedules it stops with one line where
pg_cron cannot run in the target database. `cron_database` is the explicit way around that for a
server whose pg_cron lives in another database (the test suite's clones): the job is then
scheduled from that database with `cron.schedule_in_database` (docs/database.md).

A transaction-mode pooler (Supavisor's port 6543, PgBouncer `pool_mode = transaction`) is
refused before anything runs: it hands each transaction any server session, so the session
advisory lock that serialises runners would not hold.

Only the files directly in `migrations/` are migrations. `migrations/schema/` holds the current
definition of every object, one file per area (docs/database.md); it is never applied here.

A database that records versions this folder does not have is refused too, before anything
runs: it was built by other migrations than these, and applying ours on top would mix two
histories. The usual case is a local database migrated before the migrations were squashed into
one baseline (issue 11); it is told, in one line, to run `planner dev reset`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
from loguru import logger

from listener.sqltext import split_statements, statements_match

# The .sql files are package data of the engine: the wheel ships them as listener/migrations/
# (pyproject.toml); a checkout (editable install) reads the top-level migrations/ folder.
_PACKAGED = Path(__file__).resolve().parent / "migrations"
MIGRATIONS_DIR = _PACKAGED if _PACKAGED.is_dir() else _PACKAGED.parent.parent / "migrations"
_NAME = re.compile(r"^(?P<version>\d{14})_(?P<name>[A-Za-z0-9_\-]+)\.sql$")
# Any fixed 64-bit number: serialises concurrent runners on one database.
_LOCK_KEY = 0x706C616E6E6572
#: The versions squashed into the baseline 20261201000000; a database that lists them was
#: migrated before the squash (nothing had been deployed, so only local ones can).
SQUASHED_VERSIONS = frozenset(f"2026112800{n:02d}00" for n in range(8))
#: The sweeper's pg_cron job (migrations/schema/40_access.sql schedules it under this name in
#: the database pg_cron runs in); a job scheduled from there for another database carries
#: that database's name after an `@`.
SWEEPER_JOB = "planner-sweep-stale-runs"
SWEEPER_SCHEDULE = "* * * * *"
SWEEPER_COMMAND = "select planner_engine.sweep_stale_runs()"
#: The session setting that tells the migration the sweeper is scheduled from elsewhere.
CRON_DATABASE_GUC = "planner.sweeper_cron_database"
#: SQLSTATE of a missing prerequisite (pg_cron); its message is the whole one-line error.
PREREQUISITE_SQLSTATE = "PL020"
_SWEEPER_FUNCTION = "planner_engine.sweep_stale_runs()"


class MigrationError(RuntimeError):
    """A migration could not be applied; the message says which file and why."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files in version order; a misnamed `.sql` file is an error, not skipped."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if not m:
            raise MigrationError(
                f"{path.name}: migration files must be named <14-digit timestamp>_<name>.sql"
            )
        found.append(Migration(m["version"], m["name"], path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version")
    return found


#: The table the Supabase CLI keeps its applied migrations in (created where missing).
BOOKKEEPING_SQL = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
    version text not null primary key,
    statements text[],
    name text
);
"""


async def applied(conn: asyncpg.Connection) -> dict[str, list[str] | None]:
    rows = await conn.fetch(
        "select version, statements from supabase_migrations.schema_migrations"
    )
    return {r["version"]: r["statements"] for r in rows}


def _refuse_unknown_versions(
    done: dict[str, list[str] | None], migrations: list[Migration]
) -> None:
    """Stop when the database records migrations that are not files here (one line)."""
    unknown = sorted(set(done) - {m.version for m in migrations})
    if not unknown:
        return
    if set(unknown) <= SQUASHED_VERSIONS:
        raise MigrationError(
            "this database was migrated before the migrations were squashed into one baseline "
            f"(it records {len(unknown)} old version(s), {unknown[0]} to {unknown[-1]}): "
            "run `planner dev reset` to rebuild the local database"
        )
    raise MigrationError(
        f"the database records {len(unknown)} applied migration(s) that migrations/ does not "
        f"have ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}): it was "
        "migrated from another checkout; use that checkout, or `planner dev reset` for the "
        "local database"
    )


POOLER_HINT = (
    "the database URL goes through a connection pooler in transaction mode ({why}), which "
    "hands each transaction any server session and so breaks the session lock that keeps two "
    "runners apart: migrate through the direct connection (hosted Supabase: "
    "db.<project-ref>.supabase.co:5432) or the session pooler (port 5432 of the pooler host)"
)
#: What a pooler that lost a prepared statement between two server sessions makes asyncpg raise.
_POOLER_SYMPTOMS = (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError)


async def _backend_pid(conn: asyncpg.Connection) -> int:
    pid: int = await conn.fetchval("select pg_backend_pid()")
    return pid


async def refuse_transaction_pooler(conn: asyncpg.Connection, other: asyncpg.Connection) -> None:
    """Stop when `conn` and `other`, two client connections to the same URL, are served by a
    transaction-mode pooler.

    A pooler is transparent by design, so this watches what it does: on a direct or
    session-pooled connection each client keeps one server process (`pg_backend_pid()`) for
    its whole life and two clients never share one; a transaction pooler moves a client
    between server processes and hands an idle one to the next client (PgBouncer reuses the
    most recently used first), so a few alternating queries show a shared or changing pid, or
    fail on a prepared statement the next server process does not know.
    """
    mine: set[int] = set()
    theirs: set[int] = set()
    try:
        for _ in range(3):
            mine.add(await _backend_pid(conn))
            theirs.add(await _backend_pid(other))
    except _POOLER_SYMPTOMS as exc:
        raise MigrationError(POOLER_HINT.format(
            why=f"a prepared statement was lost between queries: {exc}")) from exc
    if mine & theirs:
        raise MigrationError(POOLER_HINT.format(why="two connections shared one server process"))
    if len(mine) > 1 or len(theirs) > 1:
        raise MigrationError(
            POOLER_HINT.format(why="one connection moved between server processes"))


async def _hold_lock(conn: asyncpg.Connection) -> None:
    """Take the runners' session lock and check that this session really holds it (a pooler
    could have run the next statement on another server process)."""
    await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
    held = await conn.fetchval(
        "select exists (select from pg_locks where locktype = 'advisory' and granted"
        " and pid = pg_backend_pid()"
        " and ((classid::bigint << 32) | objid::bigint) = $1)", _LOCK_KEY)
    if not held:
        raise MigrationError(POOLER_HINT.format(why="the session lock did not stay with us"))


def with_database(dsn: str, database: str) -> str:
    """`dsn` (a postgresql:// URL) pointing at another database of the same server."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


async def schedule_sweeper_from(cron: asyncpg.Connection, database: str) -> str:
    """Schedule the sweeper for `database` from `cron`, a connection to the database pg_cron
    runs in (cron.schedule_in_database, pg_cron 1.4+); returns the job name. Scheduling again
    replaces the job of that name, so this is idempotent."""
    if not await cron.fetchval(
        "select exists (select from pg_extension where extname = 'pg_cron')"
    ):
        name = await cron.fetchval("select current_database()")
        raise MigrationError(
            f"pg_cron is not installed in database {name}, given as the cron database: "
            "name the database of cron.database_name (`show cron.database_name`)")
    job = f"{SWEEPER_JOB}@{database}"
    await cron.execute(
        "select cron.schedule_in_database($1, $2, $3, $4)",
        job, SWEEPER_SCHEDULE, SWEEPER_COMMAND, database)
    return job


async def apply_all(
    conn: asyncpg.Connection,
    directory: Path = MIGRATIONS_DIR,
    *,
    cron_dsn: str | None = None,
) -> list[Migration]:
    """Apply every pending migration on `conn`. Returns the ones applied now.

    `cron_dsn`, a connection string of the database pg_cron runs in, is the explicit setting
    for a database that cannot have pg_cron itself: the migrations then leave the sweeper out
    and it is scheduled from there (see the module docstring). Naming `conn`'s own database is
    the same as not naming one.
    """
    migrations = discover(directory)
    here: str = await conn.fetchval("select current_database()")
    cron: asyncpg.Connection | None = None
    if cron_dsn is not None:
        cron = await asyncpg.connect(cron_dsn)
        if await cron.fetchval("select current_database()") == here:
            await cron.close()
            cron = None
    try:
        if cron is not None:
            # For this session only: the migrations read it (40_access.sql).
            await conn.execute("select set_config($1, $2, false)", CRON_DATABASE_GUC,
                               await cron.fetchval("select current_database()"))
        applied_now = await _apply_locked(conn, migrations)
        if cron is not None and await conn.fetchval(
            "select to_regprocedure($1) is not null", _SWEEPER_FUNCTION
        ):
            job = await schedule_sweeper_from(cron, here)
            await conn.execute("update planner_engine.settings set sweeper_scheduled_at = now()")
            logger.info("sweeper scheduled from the cron database as job {}", job)
        return applied_now
    finally:
        if cron is not None:
            await cron.close()


async def _apply_locked(conn: asyncpg.Connection, migrations: list[Migration]) -> list[Migration]:
    await conn.execute(BOOKKEEPING_SQL)
    await _hold_lock(conn)
    try:
        done = await applied(conn)
        _refuse_unknown_versions(done, migrations)
        for mig in migrations:
            stored = done.get(mig.version)
            if stored is not None and not statements_match(stored, mig.sql):
                raise MigrationError(
                    f"{mig.path.name} was changed after it was applied (version {mig.version}); "
                    "write a new migration instead of editing an applied one"
                )
        pending = [m for m in migrations if m.version not in done]
        for mig in pending:
            try:
                async with conn.transaction():
                    await conn.execute(mig.sql)
                    await conn.execute(
                        "insert into supabase_migrations.schema_migrations"
                        " (version, statements, name) values ($1, $2, $3)",
                        mig.version,
                        split_statements(mig.sql),
                        mig.name,
                    )
            except asyncpg.PostgresError as exc:
                if exc.sqlstate == PREREQUISITE_SQLSTATE:
                    raise MigrationError(f"{mig.path.name} not applied: {exc}") from exc
                raise MigrationError(
                    f"{mig.path.name} failed and was rolled back: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            logger.info("applied migration {}", mig.path.name)
        return pending
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _LOCK_KEY)


async def migrate(
    dsn: str, directory: Path = MIGRATIONS_DIR, *, cron_database: str | None = None
) -> list[Migration]:
    """Connect to `dsn` and apply pending migrations; refuses a transaction-mode pooler.
    `cron_database`: the database (same server) pg_cron runs in, when not `dsn`'s own."""
    conn = await asyncpg.connect(dsn)
    try:
        other = await asyncpg.connect(dsn)
        try:
            await refuse_transaction_pooler(conn, other)
        finally:
            await other.close()
        cron_dsn = with_database(dsn, cron_database) if cron_database else None
        return await apply_all(conn, directory, cron_dsn=cron_dsn)
    finally:
        await conn.close()
