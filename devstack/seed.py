"""`planner dev seed`: demo organisations with realistic planning inputs on the local stack.

Each call creates NEW organisations (names carry a short random suffix) rather than updating
existing ones: a seed never touches data someone is already looking at, and two developers'
demos never collide. `planner dev reset` is the way to start from an empty database.

The teams, terms and demand come from the solver's own instance generator
(`solver.generate.generate`), which draws a witness plan that satisfies the chosen rule sets
before deriving demand from it. So the seeded allocation run is feasible by construction for
the suggested request (125 lines under VIC_PGY1) and cannot drift from the solver's rules.
Everything is inserted with the superuser DSN in one transaction per organisation, exactly as
an operator would provision a tenant; the RLS-facing roles are only the users created here.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict, dataclass
from datetime import date, timedelta

import asyncpg

from devstack import keys
from devstack.settings import DevSettings
from solver.generate import generate

#: What the seeded allocation runs are sized for (the README's demo request).
DEMO_LINES = 125
DEMO_TERMS = 5
DEMO_TEAMS = 50
DEMO_RULE_SETS = ["VIC_PGY1"]
#: The clinical year the terms are laid out in (first Monday of 2027).
YEAR_START = date(2027, 1, 4)

_ORG_NAMES = ["Monash Health", "Eastern Health", "Western Health", "Alfred Health"]


@dataclass(frozen=True)
class SeededUser:
    id: str
    email: str
    role: str
    access_token: str


@dataclass(frozen=True)
class SeededOrganization:
    id: str
    name: str
    allocation_run_id: str
    allocation_run_name: str
    n_terms: int
    n_teams: int
    n_demand_rows: int
    suggested_n_job_lines: int
    suggested_constraints: list[str]
    planner: SeededUser
    viewer: SeededUser
    admin: SeededUser


async def _user(conn: asyncpg.Connection, email: str, name: str) -> str:
    uid = str(uuid.uuid4())
    await conn.execute(
        "insert into auth.users (id, email, raw_user_meta_data) values ($1, $2, $3::jsonb)",
        uid, email, f'{{"name": "{name}"}}',
    )
    return uid


async def seed_organization(
    conn: asyncpg.Connection,
    settings: DevSettings,
    name: str,
    *,
    instance_seed: int,
    lines: int = DEMO_LINES,
    terms: int = DEMO_TERMS,
    teams: int = DEMO_TEAMS,
    rule_sets: list[str] | None = None,
) -> SeededOrganization:
    """One organisation: users (admin, planner, viewer), teams, one allocation run with demand.

    The sizes default to the demo request; tests seed smaller organisations the same way.
    """
    rule_sets = list(DEMO_RULE_SETS if rule_sets is None else rule_sets)
    problem = generate(lines=lines, terms=terms, teams=teams, rule_sets=rule_sets,
                       seed=instance_seed)
    tag = uuid.uuid4().hex[:6]
    org_name = f"{name} ({tag})"
    slug = name.lower().replace(" ", "-")
    async with conn.transaction():
        org_id = str(await conn.fetchval(
            "insert into organizations (name) values ($1) returning id", org_name))
        users: dict[str, SeededUser] = {}
        for role in ("admin", "planner", "viewer"):
            email = f"{role}.{tag}@{slug}.example"
            uid = await _user(conn, email, f"{name} {role}")
            await conn.execute(
                "insert into organization_members (organization_id, user_id, role)"
                " values ($1, $2, $3)", org_id, uid, role)
            users[role] = SeededUser(
                uid, email, role,
                keys.user_token(uid, settings.jwt_secret, email=email, lifetime_s=24 * 3600))

        run_name = f"{YEAR_START.year} PGY1 allocation"
        ar_id = str(await conn.fetchval(
            "insert into allocation_runs (organization_id, name, description)"
            " values ($1, $2, $3) returning id",
            org_id, run_name,
            f"{terms} terms, {len(problem.teams)} teams; suggested request: "
            f"{lines} lines under {', '.join(rule_sets) or 'no rule set'}",
        ))
        term_ids: dict[str, str] = {}
        starts = YEAR_START
        for ordinal, term in enumerate(problem.terms, start=1):
            term_ids[term.id] = str(await conn.fetchval(
                "insert into terms (organization_id, allocation_run_id, ordinal, name, weeks,"
                " starts_on) values ($1, $2, $3, $4, $5, $6) returning id",
                org_id, ar_id, ordinal, term.name or f"Term {ordinal}", term.weeks, starts))
            starts += timedelta(weeks=term.weeks)
        team_ids: dict[str, str] = {}
        for team in problem.teams:
            team_ids[team.id] = str(await conn.fetchval(
                "insert into teams (organization_id, name, specialty, subspecialty, kind,"
                " experiences, site, rural, tags) values ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                " returning id",
                org_id, team.name or team.id, team.specialty, team.subspecialty, team.kind,
                team.experiences, team.site, team.rural, team.tags))
        await conn.executemany(
            "insert into team_demand (organization_id, allocation_run_id, team_id, term_id,"
            " min_lines, max_lines) values ($1, $2, $3, $4, $5, $6)",
            [(org_id, ar_id, team_ids[d.team], term_ids[d.term], d.min, d.max)
             for d in problem.demand],
        )
    return SeededOrganization(
        id=org_id, name=org_name, allocation_run_id=ar_id, allocation_run_name=run_name,
        n_terms=len(term_ids), n_teams=len(team_ids), n_demand_rows=len(problem.demand),
        suggested_n_job_lines=lines, suggested_constraints=rule_sets,
        planner=users["planner"], viewer=users["viewer"], admin=users["admin"],
    )


async def seed_async(
    settings: DevSettings, *, organizations: int = 2, database: str | None = None
) -> list[SeededOrganization]:
    """Create `organizations` new demo organisations; returns what was created."""
    if organizations < 1:
        raise ValueError("seed at least one organisation")
    conn = await asyncpg.connect(settings.dsn(database))
    try:
        return [
            await seed_organization(conn, settings, _ORG_NAMES[i % len(_ORG_NAMES)],
                                    instance_seed=i + 1)
            for i in range(organizations)
        ]
    finally:
        await conn.close()


def seed(
    settings: DevSettings | None = None, *, organizations: int = 2, database: str | None = None
) -> list[SeededOrganization]:
    return asyncio.run(
        seed_async(settings or DevSettings(), organizations=organizations, database=database))


def as_json(orgs: list[SeededOrganization]) -> dict[str, object]:
    """The `--json` document: everything a demo script or UI developer needs to sign in."""
    return {"organizations": [asdict(o) for o in orgs]}
