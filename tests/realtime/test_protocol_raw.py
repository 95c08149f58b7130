"""Wire-level checks with a bare WebSocket: exact frame shapes for vsn 1.0.0 and 2.0.0.

The official clients tolerate little (the Python client drops frames that are slightly off),
so these pin down the Phoenix semantics the server copies: heartbeat replies, join replies,
duplicate joins, leave, unmatched topics, binary broadcasts, token refusal and expiry.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import aiohttp
import pytest

from devstack import keys
from tests.realtime.conftest import World
from tests.realtime.helpers import connect
from tests.support.realtime import RealtimeServer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_v1_heartbeat_and_join_shapes(
    rt_server: RealtimeServer, world: World, session: aiohttp.ClientSession
) -> None:
    c = await connect(session, rt_server, world.service_key)
    await c.send("phoenix", "heartbeat", {}, None)
    assert await c.recv() == {"topic": "phoenix", "event": "phx_reply",
                              "payload": {"status": "ok", "response": {}}, "ref": None}
    await c.send("phoenix", "heartbeat", {}, "7")
    assert (await c.recv())["ref"] == "7"
    entry = {"event": "INSERT", "schema": "public", "table": "rt_items", "filter": "qty=gt.1"}
    cfg = {"broadcast": {"self": False, "ack": False}, "presence": {"key": "", "enabled": True},
           "private": False, "postgres_changes": [entry]}
    await c.send("realtime:shapes", "phx_join", {"config": cfg}, "1", "1")
    reply = await c.recv()
    assert set(reply) == {"topic", "event", "payload", "ref"}
    assert reply["event"] == "phx_reply" and reply["ref"] == "1"
    pg = reply["payload"]["response"]["postgres_changes"]
    assert reply["payload"]["status"] == "ok" and len(pg) == 1
    assert {k: v for k, v in pg[0].items() if k != "id"} == entry
    assert isinstance(pg[0]["id"], int) and 0 < pg[0]["id"] < 2**27
    state = await c.recv()
    assert state == {"topic": "realtime:shapes", "event": "presence_state", "payload": {},
                     "ref": None}
    system = await c.recv()
    assert system == {"topic": "realtime:shapes", "event": "system", "ref": None, "payload": {
        "extension": "postgres_changes", "status": "ok", "message": "Subscribed to PostgreSQL",
        "channel": "shapes"}}


async def test_v2_duplicate_join_leave_and_unmatched(
    rt_server: RealtimeServer, world: World, session: aiohttp.ClientSession
) -> None:
    c = await connect(session, rt_server, world.service_key, "2.0.0", "/socket/websocket")
    await c.send("phoenix", "heartbeat", {}, "1")
    assert await c.recv() == [None, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]
    await c.send("realtime:dup", "phx_join", {"config": {}}, "2", "2")
    assert await c.recv() == ["2", "2", "realtime:dup", "phx_reply",
                              {"status": "ok", "response": {"postgres_changes": []}}]
    await c.send("realtime:dup", "phx_join", {"config": {}}, "3", "3")
    assert await c.recv() == ["3", "3", "realtime:dup", "phx_reply",
                              {"status": "ok", "response": {"postgres_changes": []}}]
    assert await c.recv() == ["2", "2", "realtime:dup", "phx_close", {}]
    # A push with a stale join_ref is dropped; a push to an unjoined topic is refused.
    await c.send("realtime:dup", "broadcast", {"type": "broadcast", "event": "x", "payload": {}},
                 "4", "2")
    await c.send("realtime:nope", "broadcast", {}, "5", "5")
    assert await c.recv() == ["5", "5", "realtime:nope", "phx_reply",
                              {"status": "error", "response": {"reason": "unmatched topic"}}]
    await c.send("realtime:dup", "phx_leave", {}, "6", "3")
    assert await c.recv() == ["3", "6", "realtime:dup", "phx_reply",
                              {"status": "ok", "response": {}}]
    assert await c.recv() == ["3", "3", "realtime:dup", "phx_close", {}]
    await c.send("realtime:dup", "phx_leave", {}, "7", "3")
    assert await c.recv() == ["3", "7", "realtime:dup", "phx_reply",
                              {"status": "ok", "response": {}}]


def kind3(join_ref: str, ref: str, topic: str, event: str, body: bytes) -> bytes:
    parts = [p.encode() for p in (join_ref, ref, topic, event, "")]
    return struct.pack("7B", 3, *(len(p) for p in parts), 1) + b"".join(parts) + body


async def test_binary_broadcast_crosses_serializers(
    rt_server: RealtimeServer, world: World, session: aiohttp.ClientSession
) -> None:
    v2 = await connect(session, rt_server, world.anon_key, "2.0.0")
    v1 = await connect(session, rt_server, world.anon_key, "1.0.0")
    cfg = {"config": {"broadcast": {"self": True, "ack": True}}}
    await v2.send("realtime:bin", "phx_join", cfg, "1", "1")
    await v2.recv()
    await v1.send("realtime:bin", "phx_join", {"config": {}}, "1", "1")
    await v1.recv()
    await v2.ws.send_bytes(kind3("1", "2", "realtime:bin", "evt", b'{"a":1}'))
    frames = [await v2.recv(), await v2.recv()]
    binary = next(f for f in frames if isinstance(f, bytes))
    assert binary[0] == 4
    tl, el, ml, enc = binary[1], binary[2], binary[3], binary[4]
    assert (enc, ml) == (1, 0)
    assert binary[5:5 + tl] == b"realtime:bin" and binary[5 + tl:5 + tl + el] == b"evt"
    assert binary[5 + tl + el:] == b'{"a":1}'
    assert ["1", "2", "realtime:bin", "phx_reply", {"status": "ok", "response": {}}] in frames
    assert await v1.recv() == {"topic": "realtime:bin", "event": "broadcast", "ref": None,
                               "payload": {"type": "broadcast", "event": "evt",
                                           "payload": {"a": 1}}}
    # A text broadcast from V1 reaches V2 as a text array with null refs.
    await v1.send("realtime:bin", "broadcast", {"type": "broadcast", "event": "t",
                                                 "payload": {"b": 2}}, "2", "1")
    assert await v2.recv() == [None, None, "realtime:bin", "broadcast",
                               {"type": "broadcast", "event": "t", "payload": {"b": 2}}]


async def test_refused_tokens(
    rt_server: RealtimeServer, world: World, session: aiohttp.ClientSession
) -> None:
    for token in (
        keys.api_key("anon", "another-secret-that-is-long-enough-0000"),
        keys.sign({"role": "anon"}, world.secret),  # no exp
        keys.api_key("anon", world.secret, lifetime_s=-10),
        "not-a-jwt",
    ):
        url = f"ws://{rt_server.host}:{rt_server.port}/realtime/v1/websocket?apikey={token}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect(url)
        assert err.value.status == 401
    async with session.get(
        f"{rt_server.url}/realtime/v1/websocket?apikey={keys.sign({'role': 'anon'}, world.secret)}"
    ) as resp:
        assert resp.status == 401
        assert await resp.json() == {"error": "Fields `role` and `exp` are required in JWT"}
    # A valid connection, but a join with an expired access token is refused.
    c = await connect(session, rt_server, world.anon_key)
    expired = keys.user_token(str(world.alice), world.secret, lifetime_s=-5)
    await c.send("realtime:x", "phx_join", {"config": {}, "access_token": expired}, "1", "1")
    reply = await c.recv()
    assert reply["payload"]["status"] == "error"
    assert reply["payload"]["response"]["reason"].startswith(
        "InvalidJWTToken: Token has expired ")


async def test_token_expiry_and_refresh(
    rt_server: RealtimeServer, world: World, session: aiohttp.ClientSession
) -> None:
    c = await connect(session, rt_server, world.anon_key)
    short = world.token(world.alice, lifetime_s=2)
    await c.send("realtime:exp", "phx_join", {"config": {}, "access_token": short}, "1", "1")
    assert (await c.recv())["payload"]["status"] == "ok"
    # A refresh with a longer token keeps the channel alive past the first token's expiry.
    await c.send("realtime:exp2", "phx_join", {"config": {}, "access_token": short}, "2", "2")
    assert (await c.recv())["payload"]["status"] == "ok"
    await c.send("realtime:exp2", "access_token", {"access_token": world.token(world.alice)},
                 "3", "2")
    system = await c.recv(5)
    assert system["topic"] == "realtime:exp" and system["event"] == "system"
    assert system["payload"]["status"] == "error"
    assert system["payload"]["message"].startswith("Token has expired")
    assert await c.recv() == {"topic": "realtime:exp", "event": "phx_close", "payload": {},
                              "ref": "1"}
    await c.send("realtime:exp2", "broadcast", {}, "4", "2")  # still joined: no reply, no error
    await c.send("realtime:exp", "broadcast", {}, "5", "1")
    assert (await c.recv())["payload"]["response"] == {"reason": "unmatched topic"}
    # A bad refresh closes the channel with a system error.
    await c.send("realtime:exp2", "access_token", {"access_token": "garbage"}, "6", "2")
    assert (await c.recv())["payload"]["status"] == "error"
    assert (await c.recv())["event"] == "phx_close"


async def test_healthz_and_rest_auth(
    rt_server: RealtimeServer, world: World, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{rt_server.url}/healthz") as resp:
        assert resp.status == 200
        assert (await resp.json())["replication"] == "streaming"
    body = {"messages": [{"topic": "t", "event": "e", "payload": {}}]}
    async with session.post(f"{rt_server.url}/realtime/v1/api/broadcast", json=body,
                            headers={"apikey": "bad"}) as resp:
        assert resp.status == 401
    async with session.post(f"{rt_server.url}/realtime/v1/api/broadcast", json=body,
                            headers={"apikey": world.anon_key}) as resp:
        assert resp.status == 202
    async with session.post(f"{rt_server.url}/realtime/v1/api/broadcast",
                            json={"messages": [{"topic": "t"}]},
                            headers={"Authorization": f"Bearer {world.anon_key}"}) as resp:
        assert resp.status == 422
