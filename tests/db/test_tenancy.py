"""Invariant 1 and RLS: nobody reads or writes another organisation's rows, whatever the role."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from tests.db.conftest import (
    World,
    as_user,
    claim,
    expect_sqlstate,
    insert_run,
    new_allocation_run,
    plan_json,
    request_run,
    sqlstate_of,
)
from tests.support.roles import acting_as

TENANT_TABLES = [
    "organizations", "organization_members", "allocation_runs", "terms", "teams", "team_demand",
    "allocation_planner_runs", "job_lines", "rotations", "job_lines_history",
    "planner_execution_logs",
]


@pytest.fixture(scope="module")
async def filled(su: asyncpg.Connection, world: World) -> World:
    """Give organisation A one row in every table: a committed plan, a snapshot, logs."""
    a = world.a
    run = await insert_run(su, a.id, a.allocation_run_id)
    c = await claim(su, run)
    assert c is not None
    await su.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                     run, c["lease"], a.id, plan_json(a, a.terms))
    run2 = await insert_run(su, a.id, a.allocation_run_id)
    c2 = await claim(su, run2)
    assert c2 is not None
    await su.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                     run2, c2["lease"], a.id, plan_json(a, a.terms, offset=1))
    await su.execute("insert into planner_execution_logs (planner_run_id, organization_id, level,"
                     " message) values ($1, $2, 'INFO', 'hello')", run2, a.id)
    for table in TENANT_TABLES:
        col = "id" if table == "organizations" else "organization_id"
        assert await su.fetchval(f"select count(*) from {table} where {col} = $1", a.id) > 0
    return world


def _a_filter(table: str) -> str:
    return "id = $1" if table == "organizations" else "organization_id = $1"


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_planner_of_b_cannot_read_a(pg: asyncpg.Connection, filled: World, table: str):
    for sub in (filled.b.planner, filled.b.admin, filled.b.viewer, filled.outsider):
        rows = await as_user(pg, sub, f"select count(*) from {table} where {_a_filter(table)}",
                             filled.a.id)
        assert rows[0][0] == 0, (table, sub)
    # ...while A's own viewer sees them (the test is not vacuous).
    rows = await as_user(pg, filled.a.viewer,
                         f"select count(*) from {table} where {_a_filter(table)}", filled.a.id)
    assert rows[0][0] > 0


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_anon_sees_nothing(pg: asyncpg.Connection, filled: World, table: str):
    async with acting_as(pg, "anon") as c:
        state = await sqlstate_of(c.fetch(f"select count(*) from {table}"))
    assert state == "42501"  # not even allowed to ask


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_planner_of_b_cannot_update_or_delete_a(
    pg: asyncpg.Connection, filled: World, table: str
):
    a = filled.a
    set_col = {"organizations": "name = name", "organization_members": "role = role",
               "rotations": "pinned = pinned"}.get(table, "organization_id = organization_id")
    for sql in (f"update {table} set {set_col} where {_a_filter(table)}",
                f"delete from {table} where {_a_filter(table)}"):
        async with acting_as(pg, "authenticated", sub=filled.b.admin) as c:
            try:
                status = await c.execute(sql, a.id)
            except asyncpg.PostgresError as exc:
                assert exc.sqlstate == "42501", (sql, exc)  # no grant at all
            else:
                assert status.endswith(" 0"), (sql, status)  # RLS hides every row


def _insert_for(table: str, w: World) -> tuple[str, list[Any]]:
    a, b = w.a, w.b
    ar, t0, tm0 = a.allocation_run_id, a.terms[0], a.teams[0]
    return {
        "organizations": ("insert into organizations (name) values ('x')", []),
        "organization_members": (
            "insert into organization_members values ($1, $2, 'admin')", [a.id, b.planner]),
        "allocation_runs": ("insert into allocation_runs (organization_id, name) values ($1,'x')",
                            [a.id]),
        "terms": ("insert into terms (organization_id, allocation_run_id, ordinal, name, weeks)"
                  " values ($1, $2, 99, 'x', 5)", [a.id, ar]),
        "teams": ("insert into teams (organization_id, name, specialty, subspecialty)"
                  " values ($1, 'x', 'x', 'x')", [a.id]),
        "team_demand": ("insert into team_demand (organization_id, allocation_run_id, team_id,"
                        " term_id, max_lines) values ($1, $2, $3, $4, 1)", [a.id, ar, tm0, t0]),
        "allocation_planner_runs": (
            "insert into allocation_planner_runs (organization_id, allocation_run_id,"
            " n_job_lines) values ($1, $2, 1)", [a.id, ar]),
        "job_lines": ("insert into job_lines (organization_id, allocation_run_id, line_number)"
                      " values ($1, $2, 999)", [a.id, ar]),
        "rotations": ("insert into rotations (organization_id, allocation_run_id, job_line_id,"
                      " term_id, team_id) select $1, $2, id, $3, $4 from job_lines limit 1",
                      [a.id, ar, t0, tm0]),
        "job_lines_history": (
            "insert into job_lines_history (organization_id, allocation_run_id, n_lines, plan)"
            " values ($1, $2, 0, '{\"lines\": []}')", [a.id, ar]),
        "planner_execution_logs": (
            "insert into planner_execution_logs (planner_run_id, organization_id, level, message)"
            " select id, organization_id, 'INFO', 'x' from allocation_planner_runs limit 1", []),
    }[table]


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_planner_of_b_cannot_insert_into_a(pg: asyncpg.Connection, filled: World, table: str):
    sql, args = _insert_for(table, filled)
    for sub in (filled.b.planner, filled.b.admin):
        async with expect_sqlstate("42501", "PL012"):
            await as_user(pg, sub, sql, *args)


async def test_b_cannot_attach_its_rows_to_a_parents(pg: asyncpg.Connection, filled: World):
    """Rows labelled with B's organisation but pointing at A's parents: composite keys refuse."""
    a, b = filled.a, filled.b
    attempts = [
        ("insert into terms (organization_id, allocation_run_id, ordinal, name, weeks)"
         " values ($1, $2, 42, 'x', 5)", [b.id, a.allocation_run_id]),
        ("insert into team_demand (organization_id, allocation_run_id, team_id, term_id,"
         " max_lines) values ($1, $2, $3, $4, 1)", [b.id, b.allocation_run_id, a.teams[0],
                                                     b.terms[0]]),
        ("insert into team_demand (organization_id, allocation_run_id, team_id, term_id,"
         " max_lines) values ($1, $2, $3, $4, 1)", [b.id, b.allocation_run_id, b.teams[0],
                                                     a.terms[0]]),
    ]
    for sql, args in attempts:
        async with expect_sqlstate("23503"):
            await as_user(pg, b.planner, sql, *args)
    # A run for A's allocation run under B's name: refused before it is even stored.
    async with expect_sqlstate("PL012"):
        await as_user(pg, b.planner,
                      "insert into allocation_planner_runs (organization_id, allocation_run_id,"
                      " n_job_lines) values ($1, $2, 1)", b.id, a.allocation_run_id)


async def test_planner_of_b_cannot_repoint_own_rotation_to_a_team(
    pg: asyncpg.Connection, su: asyncpg.Connection, filled: World
):
    b = filled.b
    run = await insert_run(su, b.id, b.allocation_run_id)
    c = await claim(su, run)
    assert c is not None
    await su.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                     run, c["lease"], b.id, plan_json(b, b.terms))
    async with expect_sqlstate("23503"):
        await as_user(pg, b.planner,
                      "update rotations set team_id = $1 where organization_id = $2",
                      filled.a.teams[0], b.id)
    # Only team_id and pinned are editable.
    async with expect_sqlstate("42501"):
        await as_user(pg, b.planner,
                      "update rotations set organization_id = $1 where organization_id = $2",
                      filled.a.id, b.id)


@pytest.mark.parametrize("role", ["service_role", "postgres"])
async def test_privileged_roles_cannot_cross_tenants(
    pg: asyncpg.Connection, filled: World, role: str
):
    """RLS does not bind service_role or the owner; the composite foreign keys still do."""
    a, b = filled.a, filled.b
    attempts = [
        # A's lines into B's allocation run
        ("insert into job_lines (organization_id, allocation_run_id, line_number)"
         " values ($1, $2, 500)", [a.id, b.allocation_run_id]),
        ("insert into job_lines (organization_id, allocation_run_id, line_number)"
         " values ($1, $2, 500)", [b.id, a.allocation_run_id]),
        # a rotation on a B line with an A team, or an A term
        ("update rotations set team_id = $1 where organization_id = $2", [a.teams[0], b.id]),
        ("insert into rotations (organization_id, allocation_run_id, job_line_id, term_id,"
         " team_id) select organization_id, allocation_run_id, id, $1, $2 from job_lines"
         " where organization_id = $3 limit 1", [a.terms[0], b.teams[0], b.id]),
        ("insert into terms (organization_id, allocation_run_id, ordinal, name, weeks)"
         " values ($1, $2, 77, 'x', 5)", [b.id, a.allocation_run_id]),
        ("update job_lines set allocation_run_id = $1, line_number = line_number + 1000"
         " where organization_id = $2",
         [b.allocation_run_id, a.id]),
    ]
    for sql, args in attempts:
        if role == "postgres":
            state = await sqlstate_of(pg.execute(sql, *args))
        else:
            async with acting_as(pg, role) as c:
                state = await sqlstate_of(c.execute(sql, *args))
        assert state == "23503", (role, sql, state)
    # History and logs keep no key to their runs (they outlive them); a trigger checks instead.
    history_and_logs = [
        ("insert into job_lines_history (organization_id, allocation_run_id, n_lines, plan)"
         " values ($1, $2, 0, '{\"lines\": []}')", [b.id, a.allocation_run_id]),
        ("insert into planner_execution_logs (planner_run_id, organization_id, level, message)"
         " select id, $1, 'INFO', 'x' from allocation_planner_runs where organization_id = $2"
         " limit 1", [b.id, a.id]),
        ("update job_lines_history set allocation_run_id = $1 where organization_id = $2",
         [b.allocation_run_id, a.id]),
    ]
    for sql, args in history_and_logs:
        if role == "postgres":
            state = await sqlstate_of(pg.execute(sql, *args))
        else:
            async with acting_as(pg, role) as c:
                state = await sqlstate_of(c.execute(sql, *args))
        assert state == "PL002", (role, sql, state)
    # A run of B's allocation run labelled as A's
    async with acting_as(pg, "service_role") as c:
        assert await sqlstate_of(c.execute(
            "insert into allocation_planner_runs (organization_id, allocation_run_id, n_job_lines)"
            " values ($1, $2, 1)", a.id, b.allocation_run_id)) == "PL002"


async def test_engine_cannot_commit_a_lines_into_b(
    su: asyncpg.Connection, engine: asyncpg.Connection, filled: World
):
    a, b = filled.a, filled.b
    ar, terms = await new_allocation_run(su, b.id, teams=b.teams)
    run = await insert_run(su, b.id, ar)
    c = await claim(engine, run)
    assert c is not None
    lease = c["lease"]
    # wrong organisation passed in
    async with expect_sqlstate("PL002"):
        await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                             run, lease, a.id, plan_json(b, terms))
    # A's terms / A's teams in B's plan
    async with expect_sqlstate("PL002"):
        await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                             run, lease, b.id, plan_json(b, a.terms))
    async with expect_sqlstate("PL002"):
        await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                             run, lease, b.id, plan_json(a, terms))
    # ...and logs for B's run under A's name: the line is B's (the run's organisation), and
    # without the run's lease nothing is written at all
    assert await engine.fetchval(
        "select planner_engine.write_logs($1)",
        json.dumps([{"planner_run_id": run, "organization_id": a.id, "level": "INFO",
                     "message": "cross"}])) == 0
    assert await engine.fetchval(
        "select planner_engine.write_logs($1)",
        json.dumps([{"planner_run_id": run, "lease": str(lease), "organization_id": a.id,
                     "level": "INFO", "message": "cross"}])) == 1
    assert await su.fetchval("select organization_id::text from planner_execution_logs"
                             " where planner_run_id = $1 and message = 'cross'", run) == b.id
    assert await su.fetchval("select count(*) from job_lines where allocation_run_id = $1", ar) == 0
    # The run is still ours and a correct plan goes through.
    await engine.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                         run, lease, b.id, plan_json(b, terms))


async def test_viewers_only_read(pg: asyncpg.Connection, filled: World):
    a = filled.a
    for sql, args in [
        ("insert into allocation_planner_runs (organization_id, allocation_run_id, n_job_lines)"
         " values ($1, $2, 1)", [a.id, a.allocation_run_id]),
        ("insert into teams (organization_id, name, specialty, subspecialty)"
         " values ($1, 'v', 'v', 'v')", [a.id]),
    ]:
        async with expect_sqlstate("42501", "PL012"):
            await as_user(pg, a.viewer, sql, *args)
    for sql in ("update rotations set pinned = true where organization_id = $1",
                "update teams set name = name || '!' where organization_id = $1",
                "delete from terms where organization_id = $1"):
        async with acting_as(pg, "authenticated", sub=a.viewer) as c:
            assert (await c.execute(sql, a.id)).endswith(" 0")
    async with expect_sqlstate("PL012"):
        await as_user(pg, a.viewer, "select public.restore_job_lines(id) from job_lines_history"
                      " where organization_id = $1 limit 1", a.id)


async def test_planner_edits_rotations_and_inputs_of_own_org(pg: asyncpg.Connection, filled: World):
    a = filled.a
    async with acting_as(pg, "authenticated", sub=a.planner) as c:
        assert await c.execute(
            "update rotations set pinned = true where organization_id = $1", a.id) != "UPDATE 0"
        await c.execute("insert into teams (organization_id, name, specialty, subspecialty)"
                        " values ($1, 'Planner-made', 'medicine', 'cardiology')", a.id)


async def test_members_see_their_org_and_rule_sets(pg: asyncpg.Connection, filled: World):
    rows = await as_user(pg, filled.b.viewer, "select id::text from organizations")
    assert [r[0] for r in rows] == [filled.b.id]
    rows = await as_user(pg, filled.outsider, "select count(*) from planner_rule_sets")
    assert rows[0][0] == 8
    rows = await as_user(pg, filled.outsider, "select count(*) from organizations")
    assert rows[0][0] == 0


async def test_admin_manages_members_of_own_org_only(pg: asyncpg.Connection, su: asyncpg.Connection,
                                                     filled: World):
    from tests.db.conftest import new_user

    newbie = await new_user(su)
    email = await su.fetchval("select email from auth.users where id = $1", newbie)
    # A new member comes through an invitation the user accepts (test_membership.py).
    inv = (await as_user(pg, filled.a.admin, "select public.invite_member($1, $2, 'viewer')",
                         filled.a.id, email))[0][0]
    await as_user(pg, newbie, "select public.accept_invitation($1)", inv)
    async with expect_sqlstate("42501"):
        await as_user(pg, filled.a.admin,
                      "insert into organization_members values ($1, $2, 'viewer')",
                      filled.a.id, filled.outsider)
    async with expect_sqlstate("42501"):
        await as_user(pg, filled.a.planner,
                      "insert into organization_members values ($1, $2, 'viewer')",
                      filled.a.id, filled.outsider)
    async with expect_sqlstate("42501"):
        await as_user(pg, filled.a.admin,
                      "insert into organization_members values ($1, $2, 'admin')",
                      filled.b.id, newbie)


async def test_request_run_cross_org_is_refused(pg: asyncpg.Connection, filled: World):
    async with expect_sqlstate("PL012"):
        await request_run(pg, filled.a, sub=filled.b.planner)
