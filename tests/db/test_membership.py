"""Membership (issue 14, finding 2): an organisation always keeps an admin; a user who is not a
member joins only by accepting an invitation; no error tells whether a user exists."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import asyncpg

from tests.db.conftest import World, as_user, expect_sqlstate, new_org, new_user, sqlstate_of
from tests.support.roles import acting_as


async def _email(su: asyncpg.Connection, user_id: str) -> str:
    return str(await su.fetchval("select email from auth.users where id = $1", user_id))


async def _role(su: asyncpg.Connection, org_id: str, user_id: str) -> str | None:
    role = await su.fetchval("select role from organization_members"
                             " where organization_id = $1 and user_id = $2", org_id, user_id)
    return None if role is None else str(role)


# -- the last admin ----------------------------------------------------------------------------
async def test_the_last_admin_can_be_neither_demoted_nor_removed(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    org = await new_org(su, f"Solo {uuid.uuid4().hex[:6]}")  # one admin, one planner, one viewer
    async with expect_sqlstate("PL030"):
        await as_user(pg, org.admin, "update organization_members set role = 'planner'"
                      " where organization_id = $1 and user_id = $2", org.id, org.admin)
    async with expect_sqlstate("PL030"):
        await as_user(pg, org.admin, "delete from organization_members"
                      " where organization_id = $1 and user_id = $2", org.id, org.admin)
    # Not even the service role or the owner, nor by deleting the user's account.
    async with expect_sqlstate("PL030"), acting_as(pg, "service_role") as c:
        await c.execute("delete from organization_members where organization_id = $1"
                        " and role = 'admin'", org.id)
    async with expect_sqlstate("PL030"):
        await pg.execute("delete from auth.users where id = $1", org.admin)
    assert await _role(su, org.id, org.admin) == "admin"

    # With a second admin, either one may step down, but not both.
    await as_user(pg, org.admin, "update organization_members set role = 'admin'"
                  " where organization_id = $1 and user_id = $2", org.id, org.planner)
    await as_user(pg, org.planner, "update organization_members set role = 'viewer'"
                  " where organization_id = $1 and user_id = $2", org.id, org.admin)
    async with expect_sqlstate("PL030"):
        await as_user(pg, org.planner, "delete from organization_members"
                      " where organization_id = $1 and user_id = $2", org.id, org.planner)
    # Deleting the whole organisation (an operator's act) takes its members with it.
    await pg.execute("delete from organizations where id = $1", org.id)
    assert await su.fetchval("select count(*) from organization_members"
                             " where organization_id = $1", org.id) == 0


async def test_two_admins_demoting_each_other_at_once_leave_one(
    su: asyncpg.Connection, connect: Callable[..., Awaitable[asyncpg.Connection]]
) -> None:
    """Each demotion alone is legal; together they would leave no admin. The organisation row
    lock makes the second wait for the first and then see it: exactly one succeeds."""
    org = await new_org(su, f"Duo {uuid.uuid4().hex[:6]}")
    await su.execute("update organization_members set role = 'admin'"
                     " where organization_id = $1 and user_id = $2", org.id, org.planner)
    c1, c2 = await connect(as_engine=False), await connect(as_engine=False)
    try:
        sql = ("update organization_members set role = 'viewer'"
               " where organization_id = $1 and user_id = $2")
        tx1 = c1.transaction()
        await tx1.start()
        await c1.execute("select set_config('request.jwt.claims', $1, true),"
                         " set_config('request.jwt.claim.sub', $2, true)",
                         f'{{"role": "authenticated", "sub": "{org.admin}"}}', org.admin)
        await c1.execute("set local role authenticated")
        await c1.execute(sql, org.id, org.planner)  # admin demotes the other admin
        pid2 = await c2.fetchval("select pg_backend_pid()")

        async def second() -> str | None:
            async with acting_as(c2, "authenticated", sub=org.planner) as c:
                return await sqlstate_of(c.execute(sql, org.id, org.admin))

        task = asyncio.create_task(second())
        # Wait (on the catalogue, not a fixed sleep) until the second is blocked on a lock.
        for _ in range(500):
            waiting = await su.fetchval(
                "select wait_event_type = 'Lock' from pg_stat_activity where pid = $1", pid2)
            if waiting:
                break
            await asyncio.sleep(0.01)
        assert waiting, "the second demotion never waited for the first"
        await tx1.commit()
        assert await task == "PL030"
    finally:
        await c1.close()
        await c2.close()
    assert await _role(su, org.id, org.admin) == "admin"
    assert await _role(su, org.id, org.planner) == "viewer"


# -- no direct insert, no existence oracle ----------------------------------------------------
async def test_admins_cannot_add_members_directly_nor_probe_user_ids(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    """Today's hole: an admin inserted any existing user (of any organisation) as an admin
    without consent, and the foreign-key error told which user ids exist. Now an existing and
    a made-up id get the same refusal, and moving a member row to another user is refused
    the same way (only `role` may be updated)."""
    a = world.a
    existing, made_up = world.b.admin, str(uuid.uuid4())
    states = []
    for uid in (existing, made_up):
        states.append(await sqlstate_of(as_user(
            pg, a.admin, "insert into organization_members values ($1, $2, 'admin')",
            a.id, uid)))
        states.append(await sqlstate_of(as_user(
            pg, a.admin, "update organization_members set user_id = $2"
            " where organization_id = $1 and user_id = $3", a.id, uid, a.viewer)))
        states.append(await sqlstate_of(as_user(
            pg, a.admin, "update organization_members set organization_id = $1"
            " where organization_id = $2 and user_id = $3", world.b.id, a.id, a.viewer)))
    assert states == ["42501"] * 6
    assert await _role(su, a.id, existing) is None
    # Inviting answers the same for an address with an account and one without.
    ids = [
        (await as_user(pg, a.admin, "select public.invite_member($1, $2, 'viewer')::text",
                       a.id, email))[0][0]
        for email in (await _email(su, world.b.planner), f"{uuid.uuid4().hex}@nowhere.test")
    ]
    assert all(uuid.UUID(i) for i in ids)


# -- invitations -------------------------------------------------------------------------------
async def test_an_invited_user_joins_by_accepting(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    a = world.a
    newbie = await new_user(su)
    email = await _email(su, newbie)
    inv = (await as_user(pg, a.admin, "select public.invite_member($1, $2, 'planner')::text",
                         a.id, "  " + email.upper() + " "))[0][0]
    assert await _role(su, a.id, newbie) is None  # nothing happens without consent
    # The invitee sees the invitation, the organisation's admin too, its planner not.
    for sub, n in ((newbie, 1), (a.admin, 1), (a.planner, 0), (world.b.admin, 0)):
        rows = await as_user(pg, sub, "select id::text from organization_invitations"
                             " where id = $1", inv)
        assert len(rows) == n, sub
    # Somebody else cannot accept it (same error as for an unknown id).
    for sub, inv_id in ((world.outsider, inv), (world.b.admin, inv),
                        (newbie, str(uuid.uuid4()))):
        async with expect_sqlstate("PL032"):
            await as_user(pg, sub, "select public.accept_invitation($1)", inv_id)
    org_id = (await as_user(pg, newbie, "select public.accept_invitation($1)::text", inv))[0][0]
    assert org_id == a.id
    assert await _role(su, a.id, newbie) == "planner"
    async with expect_sqlstate("PL032"):  # once
        await as_user(pg, newbie, "select public.accept_invitation($1)", inv)
    # Anonymous callers and the engine cannot call either function at all.
    async with acting_as(pg, "anon") as c:
        assert await sqlstate_of(c.execute("select public.accept_invitation($1)", inv)) \
            == "42501"


async def test_only_admins_invite_and_invitations_expire(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    a, b = world.a, world.b
    for sub in (a.planner, a.viewer, b.admin, world.outsider):
        async with expect_sqlstate("PL031"):
            await as_user(pg, sub, "select public.invite_member($1, 'x@example.test', 'admin')",
                          a.id)
    async with expect_sqlstate("22023"):
        await as_user(pg, a.admin, "select public.invite_member($1, 'not an address', 'viewer')",
                      a.id)
    async with expect_sqlstate("22023"):
        await as_user(pg, a.admin, "select public.invite_member($1, 'x@example.test', 'owner')",
                      a.id)
    newbie = await new_user(su)
    inv = (await as_user(pg, a.admin, "select public.invite_member($1, $2, 'viewer')::text",
                         a.id, await _email(su, newbie)))[0][0]
    # Inviting again updates the open invitation instead of adding one.
    again = (await as_user(pg, a.admin, "select public.invite_member($1, $2, 'admin')::text",
                           a.id, await _email(su, newbie)))[0][0]
    assert again == inv
    assert await su.fetchval("select role from organization_invitations where id = $1",
                             inv) == "admin"
    await su.execute("update organization_invitations set expires_at = now() - interval '1s'"
                     " where id = $1", inv)
    async with expect_sqlstate("PL032"):
        await as_user(pg, newbie, "select public.accept_invitation($1)", inv)
    # An admin withdraws an invitation; nobody inserts or edits one directly.
    async with expect_sqlstate("42501"):
        await as_user(pg, a.admin, "insert into organization_invitations (organization_id,"
                      " email, role) values ($1, 'y@example.test', 'admin')", a.id)
    async with expect_sqlstate("42501"):
        await as_user(pg, a.admin, "update organization_invitations set email = 'z@example.test'"
                      " where id = $1", inv)
    gone = await as_user(pg, a.admin, "delete from organization_invitations where id = $1"
                         " returning id", inv)
    assert len(gone) == 1
