"""The Supabase scaffolding of the local database behaves like a hosted project's."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg

from devstack.settings import DevSettings
from tests.support.roles import acting_as


async def test_auth_helpers_read_request_jwt_claims(pg: asyncpg.Connection):
    user = str(uuid.uuid4())
    async with acting_as(pg, "authenticated", sub=user, extra_claims={"email": "a@b.c"}) as c:
        assert str(await c.fetchval("select auth.uid()")) == user
        assert await c.fetchval("select auth.role()") == "authenticated"
        jwt = json.loads(await c.fetchval("select auth.jwt()::text"))
        assert jwt["email"] == "a@b.c" and jwt["sub"] == user
    async with acting_as(pg, "anon") as c:
        assert await c.fetchval("select auth.uid()") is None


async def test_service_role_bypasses_rls_authenticated_does_not(pg: asyncpg.Connection):
    await pg.execute(
        """
        create table scaffold_probe (id int primary key, owner uuid);
        alter table scaffold_probe enable row level security;
        create policy own on scaffold_probe for select to authenticated
          using (owner = auth.uid());
        -- explicit: the migrations revoke public's default privileges for the API roles
        grant select on scaffold_probe to anon, authenticated;
        """
    )
    me, other = str(uuid.uuid4()), str(uuid.uuid4())
    await pg.execute("insert into scaffold_probe values (1, $1), (2, $2)", me, other)
    async with acting_as(pg, "service_role") as c:
        assert await c.fetchval("select count(*) from scaffold_probe") == 2
    async with acting_as(pg, "authenticated", sub=me) as c:
        assert await c.fetchval("select array_agg(id) from scaffold_probe") == [1]
    async with acting_as(pg, "anon") as c:
        assert await c.fetchval("select count(*) from scaffold_probe") == 0
    roles = await pg.fetch(
        "select rolname, rolbypassrls, rolcanlogin from pg_roles "
        "where rolname in ('anon','authenticated','service_role','authenticator') order by 1"
    )
    assert {r["rolname"]: (r["rolbypassrls"], r["rolcanlogin"]) for r in roles} == {
        "anon": (False, False),
        "authenticated": (False, False),
        "authenticator": (False, True),
        "service_role": (True, False),
    }


async def test_realtime_objects_exist(pg: asyncpg.Connection):
    assert await pg.fetchval("select true from pg_publication where pubname='supabase_realtime'")
    assert await pg.fetchval("select to_regclass('realtime.messages')") is not None
    assert await pg.fetchval("select to_regclass('auth.users')") is not None
    async with pg.transaction():
        await pg.execute("select set_config('realtime.topic', 'planner_run:x', true)")
        assert await pg.fetchval("select realtime.topic()") == "planner_run:x"


async def test_wal2json_slot_sees_changes(pg: asyncpg.Connection):
    slot = f"probe_{uuid.uuid4().hex[:8]}"
    await pg.execute("create table wal_probe (id int primary key, note text)")
    await pg.execute("select pg_create_logical_replication_slot($1, 'wal2json', true)", slot)
    await pg.execute("insert into wal_probe values (7, 'hello')")
    rows = await pg.fetch(
        "select data from pg_logical_slot_get_changes($1, null, null, 'format-version', '2')",
        slot,
    )
    changes = [json.loads(r["data"]) for r in rows]
    inserts = [c for c in changes if c.get("action") == "I" and c.get("table") == "wal_probe"]
    assert inserts and {"name": "note", "type": "text", "value": "hello"} in inserts[0]["columns"]


async def test_pg_cron_schedules_and_runs_a_job(dev_settings: DevSettings):
    """pg_cron lives in the stack's `postgres` database; its schedule granularity is a minute,
    so this waits for the next minute boundary (at most ~60 s)."""
    conn = await asyncpg.connect(dev_settings.dsn())
    name = f"selftest_{uuid.uuid4().hex[:8]}"
    try:
        job = await conn.fetchval("select cron.schedule($1, '* * * * *', 'select 42')", name)
        ran = None
        for _ in range(140):
            ran = await conn.fetchrow(
                "select status, return_message from cron.job_run_details where jobid = $1", job
            )
            if ran is not None and ran["status"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.5)
        assert ran is not None, "pg_cron did not run the job within 70 s"
        assert ran["status"] == "succeeded", ran["return_message"]
    finally:
        await conn.execute(
            "select cron.unschedule(jobid) from cron.job where jobname = $1", name
        )
        await conn.close()
