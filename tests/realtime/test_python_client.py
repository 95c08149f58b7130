"""Conformance with the real Python `realtime` 2.34.1 client (vsn 1.0.0)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.realtime.conftest import World
from tests.realtime.helpers import Pred, PyClient, kind
from tests.support.realtime import RealtimeServer

pytestmark = pytest.mark.timeout(90)
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
async def clients(rt_server: RealtimeServer) -> AsyncIterator[list[PyClient]]:
    made: list[PyClient] = []
    yield made
    for c in made:
        await c.close()


def pg_record(**fields: object) -> Pred:
    """A postgres_changes event whose new record has these fields."""
    def pred(e: dict[str, Any]) -> bool:
        if e.get("kind") != "pg":
            return False
        record = e["payload"]["data"].get("record") or {}
        return all(record.get(k) == v for k, v in fields.items())

    return pred


def pg_type(change: str) -> Pred:
    """A postgres_changes event of this type (INSERT, UPDATE, DELETE)."""
    return lambda e: e.get("kind") == "pg" and e["payload"]["data"]["type"].value == change


def bc_payload(payload: dict[str, Any]) -> Pred:
    """A broadcast carrying exactly this payload."""
    return lambda e: e.get("kind") == "bc" and e["payload"].get("payload") == payload


def new(clients: list[PyClient], server: RealtimeServer, token: str) -> PyClient:
    c = PyClient(server.url, token)
    clients.append(c)
    return c


async def test_insert_update_delete_without_filter(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, clients: list[PyClient]
) -> None:
    c = new(clients, rt_server, world.service_key)
    ch = c.channel("plain")
    c.on_pg(ch, "*", "rt_plain")
    assert await c.subscribe(ch, wait_system=True) == "SUBSCRIBED"
    await pg.execute("insert into rt_plain values (1, 'one', 10)")
    ev = (await c.events.wait(kind("pg")))["payload"]
    data = ev["data"]
    assert data["type"].value == "INSERT" and data["table"] == "rt_plain"
    assert data["record"] == {"id": 1, "label": "one", "n": 10}
    assert "old_record" not in data and data["errors"] is None
    assert TS.match(data["commit_timestamp"])
    assert data["columns"] == [{"name": "id", "type": "int4"}, {"name": "label", "type": "text"},
                               {"name": "n", "type": "int4"}]
    await pg.execute("update rt_plain set label = 'uno' where id = 1")
    data = (await c.events.wait(kind("pg")))["payload"]["data"]
    assert data["type"].value == "UPDATE"
    assert data["record"]["label"] == "uno"
    assert data["old_record"] == {"id": 1, "label": "one", "n": 10}  # REPLICA IDENTITY FULL
    await pg.execute("delete from rt_plain where id = 1")
    data = (await c.events.wait(kind("pg")))["payload"]["data"]
    assert data["type"].value == "DELETE" and "record" not in data
    assert data["old_record"] == {"id": 1, "label": "uno", "n": 10}


async def test_event_bindings_and_typed_filters(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, clients: list[PyClient]
) -> None:
    ext = uuid.uuid4()
    c = new(clients, rt_server, world.service_key)
    ch = c.channel("filters")
    specs = {
        "qty_gt": ("INSERT", "qty=gt.9"),  # numeric: 10 > 9 although "10" < "9" as text
        "price_lte": ("INSERT", "price=lte.2.50"),
        "ext_eq": ("INSERT", f"ext_id=eq.{str(ext).upper()}"),  # uuid: case-insensitive
        "name_in": ("INSERT", 'name=in.(alpha,"b,c")'),
        "qty_neq": ("INSERT", "qty=neq.10"),
        "due_gte": ("INSERT", "due=gte.2030-01-01T00:00:00+00:00"),
        "updates": ("UPDATE", None),
    }
    for label, (event, flt) in specs.items():
        cb_label = label
        ch.on_postgres_changes(
            event,
            lambda p, lab=cb_label: c.events.add({"kind": "pg", "label": lab, "payload": p}),
            table="rt_items", filter=flt,
        )
    assert await c.subscribe(ch, wait_system=True) == "SUBSCRIBED"
    await pg.execute(
        "insert into rt_items (organization_id, name, qty, price, ext_id, due, tags, data) "
        "values ($1, 'b,c', 10, 2.5, $2, '2030-06-01T00:00:00Z', '{x,y}', '{\"k\": [1]}')",
        world.org_a, ext,
    )
    # One message per channel lists every matching binding id; the client fans it out.
    expected = {"qty_gt", "price_lte", "ext_eq", "name_in", "due_gte"}
    got = set()
    for _ in expected:
        ev = await c.events.wait(kind("pg"))
        got.add(ev["label"])
        rec = ev["payload"]["data"]["record"]
        assert rec["tags"] == ["x", "y"] and rec["data"] == {"k": [1]}
        assert rec["price"] == 2.5 and rec["due"] == "2030-06-01T00:00:00+00:00"
        assert len(ev["payload"]["ids"]) == len(expected)
    assert got == expected
    # NULL fails every operator, including neq; UPDATE bindings do not see INSERTs. The
    # UPDATE after them is the sentinel: nothing else (neither from the first INSERT nor
    # from this one) may arrive before it.
    await pg.execute("insert into rt_items (organization_id, name) values ($1, 'zzz')", world.org_a)
    await pg.execute("update rt_items set qty = 3 where name = 'zzz'")
    ev = await c.events.none_before(kind("pg"), sentinel=pg_record(name="zzz", qty=3))
    assert ev["label"] == "updates" and ev["payload"]["data"]["old_record"].keys() == {"id"}
    await pg.execute("update rt_items set qty = 4 where name = 'zzz'")
    ev = await c.events.wait(kind("pg"))
    assert ev["label"] == "updates"
    # Sentinel: an INSERT only the name_in binding matches; no second copy of the UPDATE.
    await pg.execute("insert into rt_items (organization_id, name) values ($1, 'alpha')",
                     world.org_a)
    ev = await c.events.none_before(kind("pg"), sentinel=pg_record(name="alpha"))
    assert ev["label"] == "name_in"


async def test_update_and_delete_filters_follow_new_row_and_identity(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, clients: list[PyClient]
) -> None:
    await pg.execute("insert into rt_plain values (10, 'a', 0), (11, 'b', 0)")
    c = new(clients, rt_server, world.service_key)
    ch = c.channel("moves")
    c.on_pg(ch, "*", "rt_plain", filter="n=eq.1")
    assert await c.subscribe(ch, wait_system=True) == "SUBSCRIBED"
    await pg.execute("update rt_plain set n = 1 where id = 10")  # moves into the filter
    data = (await c.events.wait(kind("pg")))["payload"]["data"]
    assert data["record"]["id"] == 10
    await pg.execute("update rt_plain set n = 2 where id = 10")  # moves out: not delivered
    await pg.execute("update rt_plain set n = 1 where id = 11")  # ...before this one
    await c.events.none_before(kind("pg"), sentinel=pg_record(id=11))
    await pg.execute("delete from rt_plain where id in (10, 11)")  # FULL identity: filterable
    data = (await c.events.wait(kind("pg")))["payload"]["data"]
    assert data["type"].value == "DELETE" and data["old_record"]["id"] == 11
    # Sentinel: a row inside the filter; the DELETE of row 10 (n = 2) must not come first.
    await pg.execute("insert into rt_plain values (12, 'c', 1)")
    await c.events.none_before(kind("pg"), sentinel=pg_record(id=12))


async def test_rls_across_two_organisations(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, clients: list[PyClient]
) -> None:
    alice = new(clients, rt_server, world.token(world.alice))
    bob = new(clients, rt_server, world.token(world.bob))
    admin = new(clients, rt_server, world.service_key)
    for c in (alice, bob, admin):
        ch = c.channel("items")
        c.on_pg(ch, "*", "rt_items")
        assert await c.subscribe(ch, wait_system=True) == "SUBSCRIBED"
    row_a = await pg.fetchval(
        "insert into rt_items (organization_id, name) values ($1, 'A1') returning id", world.org_a)
    row_b = await pg.fetchval(
        "insert into rt_items (organization_id, name) values ($1, 'B1') returning id", world.org_b)
    assert (await alice.events.wait(kind("pg")))["payload"]["data"]["record"]["id"] == row_a
    assert (await bob.events.wait(kind("pg")))["payload"]["data"]["record"]["id"] == row_b
    seen = {(await admin.events.wait(kind("pg")))["payload"]["data"]["record"]["id"]
            for _ in range(2)}
    assert seen == {row_a, row_b}
    await pg.execute("update rt_items set qty = 1 where id = $1", row_a)
    assert (await alice.events.wait(kind("pg")))["payload"]["data"]["type"].value == "UPDATE"
    await admin.events.wait(kind("pg"))
    # DELETE: sent without an RLS check, old_record cut to the primary key (RLS table). For
    # bob it is also the sentinel: A's UPDATE must not have reached him before it.
    await pg.execute("delete from rt_items where id = $1", row_a)
    deleted = await bob.events.none_before(kind("pg"), sentinel=pg_type("DELETE"))
    for c in (alice, admin):
        data = (await c.events.wait(kind("pg")))["payload"]["data"]
        assert data["type"].value == "DELETE" and data["old_record"] == {"id": row_a}
    data = deleted["payload"]["data"]
    assert data["type"].value == "DELETE" and data["old_record"] == {"id": row_a}


async def test_token_refresh_switches_identity(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, clients: list[PyClient]
) -> None:
    c = new(clients, rt_server, world.token(world.alice))
    ch = c.channel("switch")
    c.on_pg(ch, "INSERT", "rt_items")
    assert await c.subscribe(ch, wait_system=True) == "SUBSCRIBED"
    await c.client.set_auth(world.token(world.bob))
    await c.events.wait(kind("system"))  # re-subscribed with the new claims
    await pg.execute("insert into rt_items (organization_id, name) values ($1, 'A'), ($2, 'B')",
                     world.org_a, world.org_b)
    # Row A is dispatched before row B (same transaction, in order): B is the sentinel.
    data = (await c.events.none_before(kind("pg"), sentinel=pg_record(name="B")))[
        "payload"]["data"]
    assert data["record"]["name"] == "B"


async def test_unpublished_table_gets_system_error(
    rt_server: RealtimeServer, world: World, clients: list[PyClient]
) -> None:
    c = new(clients, rt_server, world.service_key)
    ch = c.channel("unpub")
    c.on_pg(ch, "*", "rt_unpublished")
    assert await c.subscribe(ch) == "SUBSCRIBED"
    # The Python client treats a `system` error as a channel error, as with Supabase.
    ev = await c.events.wait(kind("status", ch="unpub"))
    assert ev["status"] == "CHANNEL_ERROR" and "Unable to subscribe to changes" in ev["err"]


async def test_broadcast_self_ack_and_rest(
    rt_server: RealtimeServer, world: World, clients: list[PyClient]
) -> None:
    a = new(clients, rt_server, world.anon_key)
    b = new(clients, rt_server, world.anon_key)
    ch_a = a.channel("room", {"broadcast": {"self": True, "ack": True}})
    ch_b = b.channel("room")
    a.on_broadcast(ch_a)
    b.on_broadcast(ch_b, "hello")
    assert await a.subscribe(ch_a) == "SUBSCRIBED"
    assert await b.subscribe(ch_b) == "SUBSCRIBED"
    await ch_a.send_broadcast("hello", {"n": 1})
    assert (await a.events.wait(kind("bc")))["payload"] == {"event": "hello", "payload": {"n": 1}}
    assert (await b.events.wait(kind("bc")))["payload"]["payload"] == {"n": 1}
    await ch_b.send_broadcast("hello", {"n": 2})  # self: false -> b does not hear itself
    assert (await a.events.wait(kind("bc")))["payload"]["payload"] == {"n": 2}
    # a heard n=2, so the server has fanned it out; n=3 is queued to b after it would be.
    await ch_a.http_send("hello", {"n": 3})  # REST single-message endpoint
    got = await b.events.none_before(kind("bc"), sentinel=bc_payload({"n": 3}))
    assert got["payload"]["payload"] == {"n": 3}
    async with aiohttp.ClientSession() as s, s.post(
        f"{rt_server.url}/realtime/v1/api/broadcast",
        json={"messages": [{"topic": "room", "event": "hello", "payload": {"n": 4}}]},
        headers={"apikey": world.service_key},
    ) as resp:
        assert resp.status == 202
    assert (await b.events.wait(kind("bc")))["payload"]["payload"] == {"n": 4}


async def test_presence_between_python_clients(
    rt_server: RealtimeServer, world: World, clients: list[PyClient]
) -> None:
    a = new(clients, rt_server, world.anon_key)
    b = new(clients, rt_server, world.anon_key)
    chans = []
    for c, key in ((a, "alice"), (b, "bob")):
        ch = c.channel("lobby", {"presence": {"key": key, "enabled": True}})
        ch.on_presence_sync(lambda c=c: c.events.add({"kind": "sync"}))
        ch.on_presence_join(
            lambda key, cur, new, c=c: c.events.add({"kind": "join", "key": key}))
        ch.on_presence_leave(
            lambda key, cur, left, c=c: c.events.add({"kind": "leave", "key": key}))
        assert await c.subscribe(ch) == "SUBSCRIBED"
        chans.append(ch)
    await chans[0].track({"status": "online"})
    await b.events.wait(kind("join", key="alice"))
    await a.events.wait(kind("join", key="alice"))
    state = chans[1].presence_state()
    assert state["alice"][0]["status"] == "online" and "presence_ref" in state["alice"][0]
    await chans[1].track({"status": "busy"})
    await a.events.wait(kind("join", key="bob"))
    await chans[0].untrack()
    await b.events.wait(kind("leave", key="alice"))
    await b.close()
    await a.events.wait(kind("leave", key="bob"))


async def test_private_channels(
    rt_server: RealtimeServer, world: World, clients: list[PyClient]
) -> None:
    topic = f"rt-org:{world.org_a}"
    bob = new(clients, rt_server, world.token(world.bob))
    ch = bob.channel(topic, {"private": True})
    assert await bob.subscribe(ch) == "CHANNEL_ERROR"
    reason = f"Unauthorized: You do not have permissions to read from this Channel topic: {topic}"
    assert reason in bob.last_status["err"]
    await ch.unsubscribe()  # stop the client's automatic re-join attempts
    alice = new(clients, rt_server, world.token(world.alice))
    alice2 = new(clients, rt_server, world.token(world.alice))
    ch_a = alice.channel(topic, {"private": True})
    ch_a2 = alice2.channel(topic, {"private": True})
    alice2.on_broadcast(ch_a2)
    assert await alice.subscribe(ch_a) == "SUBSCRIBED"
    assert await alice2.subscribe(ch_a2) == "SUBSCRIBED"
    await ch_a.send_broadcast("secret", {"x": 1})
    assert (await alice2.events.wait(kind("bc")))["payload"]["payload"] == {"x": 1}
    # The anon key cannot read it either; a public channel of the same name is a different
    # topic and hears nothing of the private one.
    anon = new(clients, rt_server, world.anon_key)
    pub = anon.channel(topic, {"broadcast": {"self": True, "ack": False}})
    anon.on_broadcast(pub)
    assert await anon.subscribe(pub) == "SUBSCRIBED"
    await ch_a.send_broadcast("secret", {"x": 2})
    assert (await alice2.events.wait(kind("bc")))["payload"]["payload"] == {"x": 2}
    # alice2 heard x=2, so it has been fanned out; anon's own later broadcast is the sentinel.
    await pub.send_broadcast("sentinel", {"from": "anon"})
    await anon.events.none_before(kind("bc"), sentinel=bc_payload({"from": "anon"}))


async def test_supabase_client_from_url_and_key(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection
) -> None:
    """`supabase.acreate_client(SUPABASE_URL, key).channel(...)` works unchanged."""
    from supabase import acreate_client

    sb = await acreate_client(rt_server.url, world.service_key)
    got: list[dict[str, object]] = []
    ready: list[object] = []
    ch = sb.channel("sb-client")
    ch.on_postgres_changes("INSERT", got.append, table="rt_plain")
    ch.on_system(ready.append)
    await ch.subscribe()
    try:
        for _ in range(100):
            if ready:
                break
            await asyncio.sleep(0.05)
        await pg.execute("insert into rt_plain values (500, 'via supabase', 0)")
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        assert got and got[0]["data"]["record"]["id"] == 500  # type: ignore[index]
    finally:
        await sb.remove_all_channels()
