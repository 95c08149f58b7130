"""Issue 14, finding 4: private helpers without switches, role checks from the database role,
no sequence the API roles can move. Each test failed on the schema before the fix."""

from __future__ import annotations

import json
import uuid

import asyncpg

from tests.db.conftest import World, as_user, expect_sqlstate, insert_run
from tests.support.roles import acting_as

#: A run request as the admission functions take it (the insert trigger passes NEW).
RUN_ROW = ("jsonb_populate_record(null::public.allocation_planner_runs, jsonb_build_object("
           "'organization_id', $1::uuid, 'allocation_run_id', $2::uuid, 'n_job_lines', 1,"
           " 'constraints', '{}'::text[], 'options', '{}'::jsonb))")
ADMIT_USER = f"select planner_private.admit_user_run({RUN_ROW})"
ADMIT_PRIVILEGED = f"select planner_private.admit_privileged_run({RUN_ROW})"


async def test_the_admission_switch_is_gone(pg: asyncpg.Connection, world: World) -> None:
    """admit_run(..., p_check_membership => false) let any signed-in user skip the membership
    check. No function of that shape is left, and no planner_private function the API roles
    may execute takes a boolean (current_plan's provenance flag is for its owner only)."""
    assert await pg.fetchval(
        "select to_regprocedure('planner_private.admit_run(uuid, uuid, integer, text[],"
        " boolean)')") is None
    switches = await pg.fetch(
        "select p.oid::regprocedure::text from pg_proc p"
        " join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = 'planner_private' and 'boolean'::regtype = any (p.proargtypes)"
        " and (has_function_privilege('anon', p.oid, 'execute')"
        "      or has_function_privilege('authenticated', p.oid, 'execute'))")
    assert switches == []


async def test_a_non_member_learns_nothing_from_admission(
    pg: asyncpg.Connection, world: World
) -> None:
    """B's planner asking about A's organisation gets PL012 before any look-up, so an existing
    allocation run of A and a made-up id answer alike (no existence oracle)."""
    a, b = world.a, world.b
    answers = []
    for allocation_run in (a.allocation_run_id, str(uuid.uuid4())):
        try:
            await as_user(pg, b.planner, ADMIT_USER, a.id, allocation_run)
        except asyncpg.PostgresError as exc:
            answers.append((exc.sqlstate, str(exc).replace(allocation_run, "<id>")))
    assert [state for state, _ in answers] == ["PL012", "PL012"]
    assert answers[0] == answers[1]
    # And within its own organisation, A's allocation run and a made-up one read the same.
    own = []
    for allocation_run in (a.allocation_run_id, str(uuid.uuid4())):
        try:
            await as_user(pg, b.planner, ADMIT_USER, b.id, allocation_run)
        except asyncpg.PostgresError as exc:
            own.append((exc.sqlstate, str(exc).replace(allocation_run, "<id>")))
    assert [state for state, _ in own] == ["PL012", "PL012"] and own[0] == own[1]


async def test_a_user_cannot_take_the_privileged_path(
    pg: asyncpg.Connection, world: World
) -> None:
    """The membership-free admission is not executable by users, and refuses a caller whose
    database role is not privileged even when it is reached."""
    a, b = world.a, world.b
    async with expect_sqlstate("42501"):
        await as_user(pg, b.planner, ADMIT_PRIVILEGED, a.id, a.allocation_run_id)
    async with expect_sqlstate("42501"):
        await as_user(pg, b.planner,
                      f"select planner_private.admission_checks({RUN_ROW}, 'PL002')",
                      a.id, a.allocation_run_id)


async def test_service_role_claims_do_not_make_a_user_privileged(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """request_cancel trusted auth.role(): a session that set its claims' role to
    'service_role' (any session can) cancelled another organisation's run. The database role
    decides now: authenticated with forged claims is refused, the real service role is not."""
    a = world.a
    run = await insert_run(su, a.id, a.allocation_run_id)
    async with expect_sqlstate("PL012"), pg.transaction():
        # what any session may do: claims that say service_role, as the API role
        await pg.execute(
            "select set_config('request.jwt.claims', $1, true),"
            " set_config('request.jwt.claim.role', 'service_role', true)",
            json.dumps({"role": "service_role", "sub": world.outsider}))
        await pg.execute("set local role authenticated")
        assert await pg.fetchval("select auth.role()") == "service_role"
        await pg.execute("select public.request_cancel($1)", run)
    assert await su.fetchval("select status from allocation_planner_runs where id = $1",
                             run) == "PENDING"
    async with acting_as(pg, "service_role") as c:
        await c.execute("select public.request_cancel($1)", run)
    assert await su.fetchval("select status from allocation_planner_runs where id = $1",
                             run) == "CANCELLED"


async def test_api_roles_cannot_move_sequences(pg: asyncpg.Connection, world: World) -> None:
    """setval of planner_execution_logs_id_seq to its maximum broke every later log write and
    the sweeper. No sequence the migrations create is usable by anon or authenticated."""
    sequences = [r[0] for r in await pg.fetch(
        "select c.oid::regclass::text from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where c.relkind = 'S' and n.nspname in ('public', 'planner_engine', 'planner_private')")]
    assert "planner_execution_logs_id_seq" in sequences
    for role in ("anon", "authenticated"):
        for seq in sequences:
            for sql in (f"select setval('{seq}', 9223372036854775807)",
                        f"select nextval('{seq}')"):
                async with (expect_sqlstate("42501"),
                            acting_as(pg, role, sub=world.b.planner) as c):
                    await c.execute(sql)


async def test_new_objects_in_public_start_closed(pg: asyncpg.Connection) -> None:
    """The scaffolding's default privileges (everything in `public` to the API roles) no longer
    apply to what the migrations' role creates: a table, sequence or function made now carries
    no grant to anon or authenticated (functions keep PostgreSQL's own PUBLIC default, which
    the migrations revoke object by object and the attack matrix checks)."""
    tx = pg.transaction()
    await tx.start()
    try:
        await pg.execute("create table public.probe_default_privileges (id serial)")
        await pg.execute("create function public.probe_default_fn() returns int"
                         " language sql as 'select 1'")
        acls = await pg.fetch(
            "select c.relname as name, coalesce(c.relacl::text, '') as acl from pg_class c"
            " where c.relname in ('probe_default_privileges', 'probe_default_privileges_id_seq')"
            " union all select p.proname, coalesce(p.proacl::text, '') from pg_proc p"
            " where p.proname = 'probe_default_fn'")
        assert len(acls) == 3
        for row in acls:
            assert "anon=" not in row["acl"] and "authenticated=" not in row["acl"], dict(row)
    finally:
        await tx.rollback()
