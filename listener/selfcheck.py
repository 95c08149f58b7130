"""What the listener checks about its database role, at start and then periodically.

The engine role may read little for itself, so the checks live in the SECURITY DEFINER
function `planner_engine.self_check` (migrations/schema/30_engine.sql), which answers one row
per check; this module turns the failed rows into one line each that names the variable and
the fix. An error stops `planner listen` at start; while running it makes `/readyz` 503 and
pauses claiming until a later check passes (listener/app.py). Warnings are only logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from listener.db import CheckRow, EngineDB
from listener.migrate import discover

#: SQLSTATEs meaning "the function (or its schema) is not there": the database is unmigrated
#: or older than the migration that added the self-check.
NOT_MIGRATED = frozenset({"42883", "3F000", "42P01"})
INSUFFICIENT_PRIVILEGE = "42501"
VARIABLE = "PLANNER_DATABASE_URL"
MIGRATE_HINT = "run `planner migrate` with an operator's DATABASE_URL (docs/deploy.md#migrations)"


def expected_version() -> str | None:
    """The newest migration this release ships: the database must be at least there."""
    found = discover()
    return found[-1].version if found else None


@dataclass
class CheckResult:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def explain(row: CheckRow) -> str:
    """One line for a failed row."""
    if row.check_name == "schema_version":
        return f"the database is not migrated for this release ({row.detail}): {MIGRATE_HINT}"
    if row.check_name == "least_privilege":
        return (f"{VARIABLE} logs in as a privileged role ({row.detail}): use the least-"
                "privilege planner_engine role (docs/deploy.md#the-engine-role)")
    if row.check_name == "realtime_publication":
        return (f"{row.detail}: runs are found only by the catch-up scan; {MIGRATE_HINT}")
    return (f"{VARIABLE}'s role cannot use what the listener needs ({row.check_name}: "
            f"{row.detail}): log in as planner_engine, or {MIGRATE_HINT} to restore its grants")


def judge(rows: list[CheckRow]) -> CheckResult:
    result = CheckResult()
    for row in rows:
        if row.ok:
            continue
        (result.errors if row.severity == "error" else result.warnings).append(explain(row))
    return result


async def check(db: EngineDB, expected: str | None) -> CheckResult:
    """Run the self-check; a missing or forbidden function is an error like a failed row.

    Connection problems are raised, not judged: they say nothing about the role.
    """
    try:
        rows = await db.self_check(expected)
    except asyncpg.PostgresError as exc:
        state = getattr(exc, "sqlstate", None)
        if state in NOT_MIGRATED:
            return CheckResult(errors=[
                f"the database is not migrated ({exc}): {MIGRATE_HINT}"])
        if state == INSUFFICIENT_PRIVILEGE:
            return CheckResult(errors=[
                f"{VARIABLE}'s role may not run the self-check ({exc}): log in as "
                f"planner_engine, or {MIGRATE_HINT} to restore its grants"])
        raise
    return judge(rows)
