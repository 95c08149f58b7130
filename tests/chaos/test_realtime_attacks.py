"""Realtime attacks: other organisations' `planner_run:` channels, forged and expired JWTs,
and tampered events aimed at the listener. None of them may change anything.

Everything is real: the local Realtime server on the module database, the official Python
`realtime` client, raw HTTP for the REST broadcast endpoint, and a `planner listen` process.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
import pytest

from devstack import keys
from devstack.seed import SeededOrganization
from devstack.settings import DevSettings
from listener.db import EngineDB
from listener.realtime_link import CHANNEL, RealtimeLink
from tests.realtime.helpers import PyClient, kind
from tests.support.harness import (
    TERMINAL,
    ListenerProcess,
    insert_run,
    run_row,
    wait_for_status,
)
from tests.support.realtime import RealtimeServer
from tests.support.roles import acting_as

pytestmark = pytest.mark.timeout(120)
WRONG_SECRET = "an-attacker-guess-of-the-secret-with-32-plus-characters"


@pytest.fixture
async def clients() -> AsyncIterator[list[PyClient]]:
    made: list[PyClient] = []
    yield made
    for c in made:
        await c.close()


async def a_pending_run(db: asyncpg.Connection, org: SeededOrganization) -> str:
    """A's run, inserted as A's planner (no listener runs in the channel tests)."""
    return await insert_run(db, user_id=org.planner.id, organization_id=org.id,
                            allocation_run_id=org.allocation_run_id,
                            n_job_lines=org.suggested_n_job_lines,
                            constraints=org.suggested_constraints,
                            options={"time_limit_seconds": 1})


async def cancel(db: asyncpg.Connection, org: SeededOrganization, run_id: str) -> None:
    async with acting_as(db, "authenticated", sub=org.planner.id) as c:
        await c.execute("select public.request_cancel($1)", run_id)


async def rest_broadcast(server: RealtimeServer, token: str, topic: str,
                         payload: dict[str, Any], private: bool = True) -> int:
    async with aiohttp.ClientSession() as http, http.post(
        f"{server.url}/realtime/v1/api/broadcast",
        headers={"apikey": token, "Authorization": f"Bearer {token}"},
        json={"messages": [{"topic": topic, "event": "done", "payload": payload,
                            "private": private}]},
    ) as resp:
        return resp.status


async def self_echo(client: PyClient, name: str) -> Callable[[], Awaitable[None]]:
    """Join a public channel that hears its own broadcasts; the returned function sends one
    and waits for it: proof that the server has handled every frame the client sent before
    (it handles one socket's frames one at a time, in order)."""
    ch = client.channel(name, {"broadcast": {"self": True, "ack": False}})
    client.on_broadcast(ch)
    assert await client.subscribe(ch) == "SUBSCRIBED"
    sent = 0

    async def echo() -> None:
        nonlocal sent
        sent += 1
        mark = {"echo": sent}
        await ch.send_broadcast("echo", mark)
        await client.events.wait(lambda e: e.get("kind") == "bc" and e.get("ch") == name
                                 and e["payload"].get("payload") == mark, wait_s=10)

    return echo


async def test_only_members_join_a_run_channel(
    db: asyncpg.Connection, orgs: list[SeededOrganization], rt_server: RealtimeServer,
    dev_settings: DevSettings, clients: list[PyClient],
) -> None:
    a, b = orgs
    run_id = await a_pending_run(db, a)
    try:
        anon = keys.api_key("anon", dev_settings.jwt_secret)
        expected = {  # who -> (token, topic, expected status)
            "B planner": (b.planner.access_token, f"planner_run:{run_id}", "CHANNEL_ERROR"),
            "B viewer": (b.viewer.access_token, f"planner_run:{run_id}", "CHANNEL_ERROR"),
            "B admin": (b.admin.access_token, f"planner_run:{run_id}", "CHANNEL_ERROR"),
            "anon key": (anon, f"planner_run:{run_id}", "CHANNEL_ERROR"),
            "A viewer, unknown run": (a.viewer.access_token, f"planner_run:{uuid.uuid4()}",
                                      "CHANNEL_ERROR"),
            "A viewer, malformed topic": (a.viewer.access_token, "planner_run:not-a-uuid",
                                          "CHANNEL_ERROR"),
            "A viewer (control)": (a.viewer.access_token, f"planner_run:{run_id}",
                                   "SUBSCRIBED"),
        }
        got = {}
        for who, (token, topic, _) in expected.items():
            c = PyClient(rt_server.url, token)
            clients.append(c)
            ch = c.channel(topic, {"private": True})
            got[who] = await c.subscribe(ch)
            if got[who] != "SUBSCRIBED":
                await ch.unsubscribe()  # stop the client's automatic re-join attempts
        assert got == {who: e[2] for who, e in expected.items()}
    finally:
        await cancel(db, a, run_id)


async def test_nobody_but_the_engine_broadcasts_on_a_run_channel(
    db: asyncpg.Connection, orgs: list[SeededOrganization], rt_server: RealtimeServer,
    dev_settings: DevSettings, clients: list[PyClient],
) -> None:
    """Forged "done" events (B's users over REST, A's own planner over its WebSocket, the
    anon key) never reach A's watcher; the service role's does (the test can see events)."""
    a, b = orgs
    run_id = await a_pending_run(db, a)
    topic = f"planner_run:{run_id}"
    try:
        watcher = PyClient(rt_server.url, a.viewer.access_token)
        clients.append(watcher)
        ch = watcher.channel(topic, {"private": True})
        watcher.on_broadcast(ch)
        assert await watcher.subscribe(ch) == "SUBSCRIBED"
        forged = {"run_id": run_id, "status": "COMPLETED", "forged": True}
        anon = keys.api_key("anon", dev_settings.jwt_secret)
        statuses = [await rest_broadcast(rt_server, tok, topic, forged)
                    for tok in (b.planner.access_token, b.admin.access_token, anon,
                                a.planner.access_token)]
        assert all(s in (202, 401, 403) for s in statuses), statuses
        member = PyClient(rt_server.url, a.planner.access_token)
        clients.append(member)
        mch = member.channel(topic, {"private": True})
        assert await member.subscribe(mch) == "SUBSCRIBED"  # members may read...
        echo = await self_echo(member, f"echo-{run_id}")
        await mch.send_broadcast("done", forged)  # ...but not write (no INSERT policy)
        # The server handles one socket's frames in order: once the member hears its own
        # later broadcast, the forged one has been dropped or fanned out.
        await echo()
        # Control, and the sentinel: the engine's key does reach the watcher, and nothing
        # forged reached it before (the REST calls above returned after their fan-out).
        service = keys.api_key("service_role", dev_settings.jwt_secret)
        assert await rest_broadcast(rt_server, service, topic, {"run_id": run_id}) == 202
        got = await watcher.events.none_before(
            kind("bc"), sentinel=lambda e: e.get("kind") == "bc"
            and "forged" not in e["payload"]["payload"])
        assert got["payload"]["payload"] == {"run_id": run_id}
        assert (await run_row(db, run_id))["status"] == "PENDING"  # events are not state
    finally:
        await cancel(db, a, run_id)


def _bad_tokens(secret: str, user_id: str) -> dict[str, str]:
    now = int(time.time())
    return {
        "wrong secret (user)": keys.user_token(user_id, WRONG_SECRET),
        "wrong secret (service_role)": keys.api_key("service_role", WRONG_SECRET),
        "expired user token": keys.sign({"role": "authenticated", "sub": user_id,
                                         "aud": "authenticated", "iat": now - 7200,
                                         "exp": now - 3600}, secret),
        "expired service_role": keys.api_key("service_role", secret, lifetime_s=-60),
        "no exp": keys.sign({"role": "service_role"}, secret),
        # {"alg": "none"} + {"role": "service_role", "exp": 4102444800}, unsigned
        "alg none": "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
                    "eyJyb2xlIjoic2VydmljZV9yb2xlIiwiZXhwIjo0MTAyNDQ0ODAwfQ.",
        "garbage": "not-a-jwt",
    }


async def test_forged_and_expired_tokens_are_refused(
    db: asyncpg.Connection, orgs: list[SeededOrganization], rt_server: RealtimeServer,
    dev_settings: DevSettings,
) -> None:
    a, _ = orgs
    run_id = await a_pending_run(db, a)
    try:
        for name, token in _bad_tokens(dev_settings.jwt_secret, a.planner.id).items():
            # WebSocket: the connection itself is refused.
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await http.ws_connect(f"{rt_server.ws_url}?apikey={token}&vsn=1.0.0")
                assert err.value.status == 401, name
            # REST broadcast: refused, nothing delivered.
            status = await rest_broadcast(rt_server, token, f"planner_run:{run_id}",
                                          {"forged": name})
            assert status == 401, (name, status)
        assert (await run_row(db, run_id))["status"] == "PENDING"
    finally:
        await cancel(db, a, run_id)


def _change(record: dict[str, Any]) -> dict[str, Any]:
    """What a postgres_changes INSERT event looks like to the listener's callback."""
    return {"data": {"type": "INSERT", "schema": "public", "table": "allocation_planner_runs",
                     "record": record, "commit_timestamp": "2026-01-01T00:00:00Z"}}


async def test_tampered_events_change_nothing(
    db: asyncpg.Connection, orgs: list[SeededOrganization], rt_server: RealtimeServer,
    listener: ListenerProcess, dev_settings: DevSettings, engine_url: str,
    clients: list[PyClient],
) -> None:
    """Events naming another organisation's finished run, a non-existent run or a malformed id
    (a) broadcast by outsiders on the listener's own topic, and (b) fed straight into the
    listener's Realtime callback with the real claim behind it: nothing is claimed or written.
    The listener acts on the database row (`claim_run`), never on the event's contents."""
    a, b = orgs
    await listener.wait_ready()
    done_run = await a_pending_run(db, a)
    await cancel(db, a, done_run)  # A's run, terminal
    ghost = str(uuid.uuid4())
    before = {r["id"]: dict(r) for r in await db.fetch("select * from allocation_planner_runs")}
    records = [
        {"id": done_run, "organization_id": b.id, "status": "PENDING",
         "created_at": "2000-01-01T00:00:00Z"},
        {"id": ghost, "organization_id": a.id, "status": "PENDING",
         "created_at": "2000-01-01T00:00:00Z"},
        {"id": "'; drop table job_lines; --", "status": "PENDING"},
    ]
    # (a) over the wire, with keys outsiders hold: the listener's topic is private and only
    # its own role may join it, so outsiders are refused there; a REST broadcast to it is
    # dropped, and the public topic of the same name (which the listener no longer joins)
    # takes their frames and reaches nobody.
    anon = keys.api_key("anon", dev_settings.jwt_secret)
    for token in (anon, b.planner.access_token):
        refused = PyClient(rt_server.url, token)
        clients.append(refused)
        assert await refused.subscribe(refused.channel(CHANNEL, {"private": True})) \
            == "CHANNEL_ERROR"
        c = PyClient(rt_server.url, token)
        clients.append(c)
        ch = c.channel(CHANNEL)
        assert await c.subscribe(ch) == "SUBSCRIBED"
        echo = await self_echo(c, f"echo-{len(clients)}")
        for rec in records:
            for event in ("postgres_changes", "INSERT", "*"):
                await ch.send_broadcast(event, _change(rec))
        for private in (True, False):
            assert await rest_broadcast(rt_server, token, CHANNEL, _change(records[0]),
                                        private=private) in (202, 401)
        await echo()  # every tampered frame of this socket has been fanned out
    # (b) into the listener's own callback, with the real engine claim behind every hint.
    hints: list[uuid.UUID] = []
    link = RealtimeLink(rt_server.url, anon, on_run=lambda rid, _ts: hints.append(rid),
                        on_subscribed=lambda: None)
    for rec in records:
        link._on_change(_change(rec))  # type: ignore[arg-type]
    assert [str(h) for h in hints] == [done_run, ghost]  # the malformed id is dropped
    eng = await EngineDB.connect(engine_url, max_size=1)
    try:
        claimed = [await eng.claim("tamper-test", h) for h in hints]
    finally:
        await eng.close()
    assert claimed == [None, None]
    # The sentinel: a real run, inserted after every tampered event reached the listener's
    # socket (the echoes above), whose change event comes after them on that socket. Once
    # the listener has completed it, it has long handled the tampered ones.
    status, ready = listener.readiness()
    assert status == 200 and ready["database"] is True
    real = await a_pending_run(db, a)
    row = await wait_for_status(db, real, TERMINAL, timeout_s=60)
    assert row["status"] == "COMPLETED"  # the listener is unharmed: it completes a real run
    after = {r["id"]: dict(r) for r in await db.fetch("select * from allocation_planner_runs")}
    assert str(after.pop(row["id"])["id"]) == real
    assert after == before
    assert await db.fetchval("select count(*) from allocation_planner_runs where id::text = $1",
                             ghost) == 0
    assert not [r for r in listener.records()
                if r.get("planner_run_id") in (done_run, ghost)]
    # ...and still ready afterwards.
    status, ready = listener.readiness()
    assert status == 200 and ready["database"] is True
