"""Apply `migrations/*.sql` to any PostgreSQL database, hosted Supabase included.

Each file `migrations/<14-digit timestamp>_<name>.sql` runs in its own transaction and is
recorded in `supabase_migrations.schema_migrations` (version, name, statements), the table the
Supabase CLI keeps, so a team can switch between this runner and `supabase db push`. The file's
text is stored whole as the single element of `statements`; a later run compares it and refuses
to continue when an applied file was edited, because silently diverging schemas are worse than
a loud stop. A failing file is rolled back whole; files before it stay recorded.

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

import asyncpg
from loguru import logger

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


async def apply_all(
    conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR
) -> list[Migration]:
    """Apply every pending migration on `conn`. Returns the ones applied now."""
    migrations = discover(directory)
    await conn.execute(BOOKKEEPING_SQL)
    await conn.execute("select pg_advisory_lock($1)", _LOCK_KEY)
    try:
        done = await applied(conn)
        _refuse_unknown_versions(done, migrations)
        for mig in migrations:
            stored = done.get(mig.version)
            if stored is not None and "".join(stored) != mig.sql:
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
                        [mig.sql],
                        mig.name,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"{mig.path.name} failed and was rolled back: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            logger.info("applied migration {}", mig.path.name)
        return pending
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _LOCK_KEY)


async def migrate(dsn: str, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Connect to `dsn` and apply pending migrations."""
    conn = await asyncpg.connect(dsn)
    try:
        return await apply_all(conn, directory)
    finally:
        await conn.close()
