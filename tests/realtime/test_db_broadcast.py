"""Broadcast from the database: `realtime.send` reaches the official clients, as on hosted.

A message row that `realtime.send(payload, event, topic, private)` writes into
`realtime.messages` is streamed to the topic's subscribers (supabase/realtime's
`Tenants.ReplicationConnection`): private topics only to channels whose join the read policies
admitted, with `meta.id` and the message id added to the payload; rolled-back or refused sends
reach nobody. Negative checks use a later send as the witness (`Events.none_before`): messages
leave the server in commit order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.realtime.conftest import World
from tests.realtime.helpers import JsClient, Pred, PyClient, kind
from tests.support.realtime import RealtimeServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def clients(rt_server: RealtimeServer) -> AsyncIterator[list[PyClient]]:
    made: list[PyClient] = []
    yield made
    for c in made:
        await c.close()


def bc(event: str, **payload: Any) -> Pred:
    """A Python client broadcast event whose payload holds these fields."""
    def pred(e: dict[str, Any]) -> bool:
        if e.get("kind") != "bc" or e["payload"].get("event") != event:
            return False
        body = e["payload"].get("payload") or {}
        return all(body.get(k) == v for k, v in payload.items())

    return pred


async def send(pg: asyncpg.Connection, payload: dict[str, Any], event: str, topic: str,
               private: bool = True) -> None:
    await pg.execute("select realtime.send($1::jsonb, $2, $3, $4)",
                     json.dumps(payload), event, topic, private)


async def test_send_reaches_private_subscribers_only(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, clients: list[PyClient]
) -> None:
    topic = f"rt-org:{world.org_a}"
    alice = PyClient(rt_server.url, world.token(world.alice))
    clients.append(alice)
    ch = alice.channel(topic, {"private": True})
    alice.on_broadcast(ch)
    assert await alice.subscribe(ch) == "SUBSCRIBED"
    # Someone else's topic: bob (a member of B) and anon are refused at the join, as on hosted.
    reason = f"Unauthorized: You do not have permissions to read from this Channel topic: {topic}"
    for token in (world.token(world.bob), world.anon_key):
        other = PyClient(rt_server.url, token)
        clients.append(other)
        och = other.channel(topic, {"private": True})
        assert await other.subscribe(och) == "CHANNEL_ERROR"
        assert reason in other.last_status["err"]
        await och.unsubscribe()
    # A public channel of the same name is another topic: it hears public sends only.
    anon = PyClient(rt_server.url, world.anon_key)
    clients.append(anon)
    pub = anon.channel(topic)
    anon.on_broadcast(pub)
    assert await anon.subscribe(pub) == "SUBSCRIBED"

    await send(pg, {"n": 1}, "progress", topic)
    got = await alice.events.wait(bc("progress", n=1))
    body = got["payload"]
    # hosted: the message id goes into the payload (when it has none) and into meta
    message_id = body["payload"]["id"]
    assert uuid.UUID(message_id) and body.get("meta") == {"id": message_id}, body
    assert await pg.fetchval("select private from realtime.messages where id = $1",
                             uuid.UUID(message_id)) is True
    await send(pg, {"n": 2, "id": "mine"}, "progress", topic)
    assert (await alice.events.wait(bc("progress", n=2)))["payload"]["payload"]["id"] == "mine"

    await send(pg, {"public": True}, "hello", topic, private=False)
    await anon.events.none_before(kind("bc"), sentinel=bc("hello", public=True))
    await send(pg, {"n": 3}, "progress", topic)
    await alice.events.none_before(bc("hello"), sentinel=bc("progress", n=3))


async def test_send_reaches_realtime_js(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection
) -> None:
    """realtime-js (vsn 2.0.0, what UIs use) gets the same message: payload, event, meta."""
    topic = f"rt-org:{world.org_a}"
    js = JsClient(rt_server.url, world.token(world.alice))
    await js.start()
    try:
        await js.cmd(cmd="setAuth", token=world.token(world.alice))
        spec = {"config": {"private": True}, "broadcast": ["done"]}
        assert await js.channel(topic, **spec) == "SUBSCRIBED"
        await send(pg, {"status": "COMPLETED"}, "done", topic)
        got = await js.events.wait(lambda e: e.get("type") == "broadcast", 10)
        msg = got["payload"]
        assert (msg["type"], msg["event"], msg["payload"]["status"]) == \
            ("broadcast", "done", "COMPLETED"), msg
        assert msg["meta"] == {"id": msg["payload"]["id"]}, msg
    finally:
        await js.close()


async def test_rolled_back_and_refused_sends_reach_nobody(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, clients: list[PyClient]
) -> None:
    """Only committed rows the sender may write go out: a rolled-back send, and sends that
    RLS on realtime.messages refuses (anon; bob, who is not a member of A) reach nobody; a
    refusal is a WARNING and the sender's transaction carries on, as on hosted."""
    topic = f"rt-org:{world.org_a}"
    alice = PyClient(rt_server.url, world.token(world.alice))
    clients.append(alice)
    ch = alice.channel(topic, {"private": True})
    alice.on_broadcast(ch)
    assert await alice.subscribe(ch) == "SUBSCRIBED"

    tx = pg.transaction()
    await tx.start()
    await send(pg, {"n": "rolled back"}, "progress", topic)
    await tx.rollback()

    async def send_as(role: str, user: uuid.UUID | None, n: str) -> None:
        claims = json.dumps({"sub": str(user), "role": role} if user else {"role": role})
        async with pg.transaction():
            await pg.execute("select set_config('request.jwt.claims', $1, true)", claims)
            await pg.execute(f"set local role {role}")
            await send(pg, {"n": n}, "progress", topic)
            assert await pg.fetchval("select 1") == 1  # the transaction is still usable

    await send_as("anon", None, "anon")
    await send_as("authenticated", world.bob, "bob")
    await send_as("authenticated", world.alice, "alice")  # rt_org_write admits alice
    refused = {"rolled back", "anon", "bob"}
    await alice.events.none_before(
        lambda e: e.get("kind") == "bc" and e["payload"]["payload"].get("n") in refused,
        sentinel=bc("progress", n="alice"))
    assert await pg.fetchval(
        "select count(*) from realtime.messages where topic = $1 and payload->>'n' = any($2)",
        topic, list(refused)) == 0
