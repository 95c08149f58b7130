"""Fixtures for the database-layer tests: two organisations with users, inputs and helpers.

Every module gets its own cloned database (tests/conftest.py), so the `world` below is built
once per module and tests add the rows they need on top of it. Rows are inserted as the
superuser, the way an operator or `planner dev seed` would.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from tests.support.databases import GENEROUS_LIMITS_SQL
from tests.support.roles import acting_as


@dataclass
class Org:
    id: str
    name: str
    admin: str
    planner: str
    viewer: str
    allocation_run_id: str
    terms: list[str] = field(default_factory=list)  # ordered by ordinal
    teams: list[str] = field(default_factory=list)


@dataclass
class World:
    a: Org
    b: Org
    outsider: str  # signed in, member of nothing


async def new_user(conn: asyncpg.Connection) -> str:
    uid = str(uuid.uuid4())
    await conn.execute("insert into auth.users (id, email) values ($1, $2)", uid,
                       f"{uid[:8]}@example.test")
    return uid


async def new_allocation_run(
    conn: asyncpg.Connection, org_id: str, *, n_terms: int = 3, teams: list[str] | None = None,
) -> tuple[str, list[str]]:
    """An allocation run with `n_terms` terms and demand 0..10 for each given team."""
    ar = await conn.fetchval(
        "insert into allocation_runs (organization_id, name) values ($1, $2) returning id::text",
        org_id, f"run {uuid.uuid4().hex[:6]}",
    )
    terms = [
        await conn.fetchval(
            "insert into terms (organization_id, allocation_run_id, ordinal, name, weeks) "
            "values ($1, $2, $3, $4, 10) returning id::text",
            org_id, ar, i, f"Term {i}",
        )
        for i in range(1, n_terms + 1)
    ]
    for team in teams or []:
        for term in terms:
            await conn.execute(
                "insert into team_demand (organization_id, allocation_run_id, team_id, term_id,"
                " min_lines, max_lines) values ($1, $2, $3, $4, 0, 10)",
                org_id, ar, team, term,
            )
    return ar, terms


async def new_org(
    conn: asyncpg.Connection, name: str, *, runs_per_hour: int | None = 100000
) -> Org:
    """An organisation with members, five teams and an allocation run. `runs_per_hour` set:
    its own limits row lifts the rates and budgets (runs per hour = that, queued runs and
    solver seconds out of reach), so tests are not refused by them; None: the defaults."""
    org_id = await conn.fetchval(
        "insert into organizations (name) values ($1) returning id::text", name)
    if runs_per_hour is not None:
        await conn.execute(GENEROUS_LIMITS_SQL, org_id, runs_per_hour)
    users = {}
    for role in ("admin", "planner", "viewer"):
        users[role] = await new_user(conn)
        await conn.execute(
            "insert into organization_members (organization_id, user_id, role) values ($1,$2,$3)",
            org_id, users[role], role,
        )
    teams = [
        await conn.fetchval(
            "insert into teams (organization_id, name, specialty, subspecialty, kind,"
            " experiences, site, rural, tags) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            " returning id::text",
            org_id, f"{name} team {i}", spec, sub, kind, exp, site, rural, tags,
        )
        for i, (spec, sub, kind, exp, site, rural, tags) in enumerate([
            ("medicine", "general medicine", "clinical", ["A", "B"], "MMC", False, []),
            ("surgery", "general surgery", "clinical", ["C", "D"], "MMC", False, []),
            ("emergency", "emergency medicine", "clinical", ["A", "C"], None, False, []),
            ("service", "nights", "service", ["C"], "MMC", False, ["NIGHTS"]),
            ("medicine", "geriatrics", "clinical", ["B"], "WARRAGUL", True, []),
        ])
    ]
    ar, terms = await new_allocation_run(conn, org_id, teams=teams)
    return Org(org_id, name, users["admin"], users["planner"], users["viewer"], ar, terms, teams)


@pytest.fixture(scope="module")
async def su(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A module-wide superuser connection (the function-scoped `pg` is per test)."""
    conn = await asyncpg.connect(db_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def world(su: asyncpg.Connection) -> World:
    a = await new_org(su, "Alpha Health")
    b = await new_org(su, "Beta Health")
    return World(a, b, await new_user(su))


@pytest.fixture
async def engine(engine_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the listener's own role, planner_engine."""
    conn = await asyncpg.connect(engine_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def connect(db_url: str, engine_url: str) -> Callable[..., Awaitable[asyncpg.Connection]]:
    """Open extra connections (closed by the test) for concurrency tests."""

    async def _connect(as_engine: bool = True) -> asyncpg.Connection:
        return await asyncpg.connect(engine_url if as_engine else db_url)

    return _connect


# -- helpers ---------------------------------------------------------------------------------
async def sqlstate_of(awaitable: Awaitable[Any]) -> str | None:
    """Await; return the SQLSTATE of the PostgreSQL error raised, or None if it succeeded."""
    try:
        await awaitable
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate)
    return None


@asynccontextmanager
async def expect_sqlstate(*codes: str) -> AsyncIterator[None]:
    """The block must raise a PostgreSQL error with one of `codes`."""
    try:
        yield
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate in codes, f"expected {codes}, got {exc.sqlstate}: {exc}"
    else:
        raise AssertionError(f"expected SQLSTATE {codes}, but the statement succeeded")


async def as_user(conn: asyncpg.Connection, sub: str, sql: str, *args: Any) -> Any:
    """Run one statement as `authenticated` with `sub`; return fetch() rows."""
    async with acting_as(conn, "authenticated", sub=sub) as c:
        return await c.fetch(sql, *args)


async def request_run(
    conn: asyncpg.Connection, org: Org, *, allocation_run_id: str | None = None,
    n_job_lines: int = 2, constraints: list[str] | None = None, sub: str | None = None,
) -> str:
    """A run requested the way the UI does it (as the org's planner)."""
    rows = await as_user(
        conn, sub or org.planner,
        "insert into allocation_planner_runs (organization_id, allocation_run_id, n_job_lines,"
        " constraints) values ($1, $2, $3, $4) returning id::text",
        org.id, allocation_run_id or org.allocation_run_id, n_job_lines, constraints or [],
    )
    return str(rows[0]["id"])


async def insert_run(conn: asyncpg.Connection, org_id: str, allocation_run_id: str,
                     **fields: Any) -> str:
    """A run inserted as superuser with any engine fields set (for lifecycle tests)."""
    fields = {"n_job_lines": 2, **fields}
    cols = ["organization_id", "allocation_run_id", *fields]
    vals = [org_id, allocation_run_id, *fields.values()]
    ph = ", ".join(f"${i + 1}" for i in range(len(vals)))
    return str(await conn.fetchval(
        f"insert into allocation_planner_runs ({', '.join(cols)}) values ({ph}) returning id::text",
        *vals,
    ))


async def claim(conn: asyncpg.Connection, run_id: str | None = None,
                worker: str = "w1") -> asyncpg.Record | None:
    rows = await conn.fetch("select * from planner_engine.claim_run($1, $2)", worker, run_id)
    assert len(rows) <= 1
    return rows[0] if rows else None


def plan_json(org: Org, terms: list[str], n_lines: int = 2, *, offset: int = 0,
              pinned: dict[int, list[str]] | None = None) -> str:
    """A complete plan: line i takes team (i + t + offset) in term t."""
    lines = []
    for i in range(n_lines):
        rot = {term: org.teams[(i + t + offset) % len(org.teams)] for t, term in enumerate(terms)}
        lines.append({"line": i + 1, "rotations": rot, "pinned": (pinned or {}).get(i + 1, [])})
    return json.dumps({"lines": lines})


async def current_plan(conn: asyncpg.Connection, allocation_run_id: str) -> Any:
    raw = await conn.fetchval(
        "select planner_private.current_plan($1, false)::text", allocation_run_id)
    return None if raw is None else json.loads(raw)
