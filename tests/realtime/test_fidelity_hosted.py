"""Where hosted Supabase Realtime behaves differently from a naive server and a UI would notice.

Each test pins one hosted behaviour down (sources: supabase/realtime `realtime.apply_rls`,
`subscription_check_filters`, `check_equality_op`, `Subscriptions.parse_subscription_params`,
`UserSocket.error_response`, `RealtimeChannel` join clauses; see docs/realtime.md):
`Error 401: Unauthorized` rows, column privileges and `select` lists, the filter operators and
their error texts, connect/join error texts, and the stack's opaque API keys.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from devstack import keys
from tests.realtime.conftest import World
from tests.realtime.helpers import PyClient, Raw, connect, kind
from tests.support.realtime import RealtimeServer

pytestmark = pytest.mark.timeout(60)

TABLES_SQL = """
-- anon may read v but not the primary key; authenticated may read every column.
create table public.rt_secret (id int primary key, v text);
grant select, insert, update, delete on public.rt_secret to authenticated, service_role;
revoke all on public.rt_secret from anon;
grant select (v) on public.rt_secret to anon;
-- anon may read id and v only.
create table public.rt_partial (id int primary key, v text, secret text);
revoke all on public.rt_partial from anon;
grant select (id, v) on public.rt_partial to anon;
grant select on public.rt_partial to service_role;
-- typed columns for the filter operators
create table public.rt_ops (id int primary key, name text, label varchar(20), flag boolean,
                            n int);
grant select on public.rt_ops to anon, authenticated, service_role;
alter publication supabase_realtime add table public.rt_secret, public.rt_partial, public.rt_ops;
"""


@pytest.fixture(scope="module")
async def tables(world: World, db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(TABLES_SQL)
    finally:
        await conn.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def clients() -> AsyncIterator[list[PyClient]]:
    made: list[PyClient] = []
    yield made
    for c in made:
        await c.close()


def is_event(event: str) -> Any:
    return lambda f: isinstance(f, dict) and f.get("event") == event


async def join_pg(c: Raw, topic: str, *bindings: dict[str, Any]) -> list[dict[str, Any]]:
    """Join with postgres_changes bindings; returns the `system` frame that follows."""
    cfg = {"broadcast": {"self": False, "ack": False}, "presence": {"key": "", "enabled": False},
           "private": False, "postgres_changes": list(bindings)}
    await c.send(f"realtime:{topic}", "phx_join", {"config": cfg}, "1", "1")
    reply = await c.recv_until(is_event("phx_reply"))
    assert reply["payload"]["status"] == "ok", reply
    system = await c.recv_until(is_event("system"))
    return [reply, system]


async def test_role_without_select_on_the_key_gets_401_rows(
    rt_server: RealtimeServer, world: World, tables: None, pg: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    c = await connect(session, rt_server, world.anon_key)
    # The filter (on a column anon may read) cannot match: hosted does not apply filters to
    # the error rows.
    _, system = await join_pg(c, "secret", {"event": "*", "schema": "public",
                                            "table": "rt_secret", "filter": "v=eq.never"})
    assert system["payload"]["status"] == "ok", system
    await pg.execute("insert into rt_secret values (1, 'hidden')")
    change = await c.recv_until(is_event("postgres_changes"))
    assert change["payload"]["data"] == {
        "schema": "public", "table": "rt_secret", "type": "INSERT", "commit_timestamp": None,
        "columns": [], "errors": ["Error 401: Unauthorized"], "record": {}}
    await pg.execute("update rt_secret set v = 'still hidden' where id = 1")
    change = await c.recv_until(is_event("postgres_changes"))
    assert change["payload"]["data"]["errors"] == ["Error 401: Unauthorized"]
    assert change["payload"]["data"]["record"] == {} == change["payload"]["data"]["old_record"]
    assert change["payload"]["data"]["type"] == "UPDATE"


async def test_columns_the_role_cannot_read_are_left_out(
    rt_server: RealtimeServer, world: World, tables: None, pg: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    c = await connect(session, rt_server, world.anon_key)
    await join_pg(c, "partial", {"event": "INSERT", "schema": "public", "table": "rt_partial"})
    await pg.execute("insert into rt_partial values (1, 'shown', 'kept back')")
    data = (await c.recv_until(is_event("postgres_changes")))["payload"]["data"]
    assert data["errors"] is None and data["record"] == {"id": 1, "v": "shown"}
    assert [col["name"] for col in data["columns"]] == ["id", "v"]
    # A filter on a column the role cannot read is refused like an unknown column.
    c2 = await connect(session, rt_server, world.anon_key)
    _, system = await join_pg(c2, "partial-bad", {"event": "INSERT", "schema": "public",
                                                  "table": "rt_partial",
                                                  "filter": "secret=eq.x"})
    assert system["payload"]["status"] == "error"
    assert system["payload"]["message"].endswith(
        "Exception: ERROR P0001 (raise_exception) invalid column for filter secret")


async def test_select_lists_keep_the_key_and_the_named_columns(
    rt_server: RealtimeServer, world: World, tables: None, pg: asyncpg.Connection,
    session: aiohttp.ClientSession,
) -> None:
    c = await connect(session, rt_server, world.service_key)
    reply, system = await join_pg(
        c, "select", {"event": "INSERT", "schema": "public", "table": "rt_ops",
                      "select": ["name"]})
    assert system["payload"]["status"] == "ok"
    assert reply["payload"]["response"]["postgres_changes"][0]["select"] == ["name"]
    await pg.execute("insert into rt_ops values (100, 'sel', 'x', true, 1)")
    data = (await c.recv_until(is_event("postgres_changes")))["payload"]["data"]
    assert data["record"] == {"id": 100, "name": "sel"}
    assert [col["name"] for col in data["columns"]] == ["id", "name"]
    refused = {
        "wildcard": ({"event": "*", "schema": "public", "table": "*", "select": ["name"]},
                     "Column selection is not supported for wildcard subscriptions. Provide "
                     "an explicit schema and table name."),
        "string": ({"event": "*", "schema": "public", "table": "rt_ops", "select": "name"},
                   'Error parsing `select` params: expected a list of column name strings, '
                   'e.g. select: ["col1", "col2"]'),
    }
    for topic, (binding, message) in refused.items():
        c2 = await connect(session, rt_server, world.service_key)
        _, system = await join_pg(c2, topic, binding)
        assert system["payload"] == {"extension": "postgres_changes", "status": "error",
                                     "message": message, "channel": topic}
    c3 = await connect(session, rt_server, world.service_key)
    _, system = await join_pg(c3, "bad-col", {"event": "*", "schema": "public",
                                              "table": "rt_ops", "select": ["nope"]})
    assert system["payload"]["message"] == (
        "Unable to subscribe to changes with given parameters. An exception happened so "
        "please check your connect parameters: [event: *, schema: public, table: rt_ops, "
        'filters: [], select: ["nope"]]. Exception: ERROR P0001 (raise_exception) invalid '
        "column for select nope")


async def test_filter_operators_with_the_python_client(
    rt_server: RealtimeServer, world: World, tables: None, pg: asyncpg.Connection,
    clients: list[PyClient],
) -> None:
    c = PyClient(rt_server.url, world.service_key)
    clients.append(c)
    await c.client.connect()
    ch = c.channel("ops")
    specs = {
        "like": "name=like.Wid%",
        "like_miss": "name=like.wid%",
        "ilike": "name=ilike.wid%",
        "not_ilike": "name=not.ilike.gad%",
        "is_null": "n=is.null",
        "not_is_null": "n=not.is.null",
        "is_true": "flag=is.true",
        "is_false": "flag=is.false",
        "match": "name=match.^W.d",
        "match_miss": "name=match.^w",
        "imatch": "name=imatch.^w",
        "isdistinct": "n=isdistinct.3",
        "not_isdistinct": "n=not.isdistinct.3",
    }
    for label, flt in specs.items():
        ch.on_postgres_changes(
            "INSERT", lambda p, lab=label: c.events.add({"kind": "pg", "label": lab,
                                                         "payload": p}),
            table="rt_ops", filter=flt,
        )
    assert await c.subscribe(ch, wait_system=True) == "SUBSCRIBED"
    await pg.execute("insert into rt_ops values (1, 'Widget', 'w', true, null)")
    expected = {"like", "ilike", "not_ilike", "is_null", "is_true", "match", "imatch",
                "isdistinct"}
    got = set()
    for _ in expected:
        ev = await c.events.wait(kind("pg"))
        got.add(ev["label"])
        # One message lists every matching binding: the misses are provably not in it.
        assert len(ev["payload"]["ids"]) == len(expected)
    assert got == expected


async def test_filter_errors_carry_hosted_texts_once(
    rt_server: RealtimeServer, world: World, tables: None, session: aiohttp.ClientSession,
) -> None:
    cases = {
        "undefined": 'Error parsing `filter` params: ["undefined"]',
        "name=foo.hey": 'Error parsing `filter` params: ["foo", "hey"]',
        "n=in.3": "Error parsing `filter` params: `in` filter value must be wrapped by "
                  "parentheses",
        "label=like.x%": "Unable to subscribe to changes with given parameters. An exception "
                         "happened so please check your connect parameters: [event: INSERT, "
                         'schema: public, table: rt_ops, filters: [{"label", "like", "x%", '
                         "false}], select: nil]. Exception: ERROR P0001 (raise_exception) "
                         "operator like requires a text-compatible column type, got "
                         "character varying",
        "n=is.true": "Exception: ERROR P0001 (raise_exception) is true filter requires a "
                     "boolean column, got integer",
        "n=eq.x": 'invalid input syntax for type integer: "x"',
    }
    for i, (flt, message) in enumerate(cases.items()):
        c = await connect(session, rt_server, world.service_key)
        topic = f"bad-filter-{i}"
        _, system = await join_pg(c, topic, {"event": "INSERT", "schema": "public",
                                             "table": "rt_ops", "filter": flt})
        got = system["payload"]
        assert got["status"] == "error" and got["extension"] == "postgres_changes", got
        assert message in got["message"], (flt, got)
        assert got["message"].count("Error parsing `filter` params:") <= 1, got


async def test_connect_and_join_refusals_carry_hosted_texts(
    rt_server: RealtimeServer, world: World, session: aiohttp.ClientSession,
) -> None:
    base = f"ws://{rt_server.host}:{rt_server.port}/realtime/v1/websocket?vsn=1.0.0"
    cases = {
        f"&apikey={keys.api_key('anon', world.secret, lifetime_s=-5)}":
            (401, {"error": "Token has expired"}),
        f"&apikey={keys.api_key('anon', world.secret + 'x')}":
            (401, {"error": "Failed to validate JWT signature"}),
        "&apikey=not-a-jwt": (401, {"error": "The token provided is not a valid JWT"}),
        "": (401, {"error": "API key is missing"}),
        "&apikey=sb_publishable_not-this-stacks": (
            401, {"message": "Invalid API key",
                  "hint": "Double check your Supabase `anon` or `service_role` API key."}),
    }
    for query, (status, body) in cases.items():
        async with session.get(base + query, headers={
                "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as resp:
            assert (resp.status, await resp.json()) == (status, body), query
    c = await connect(session, rt_server, world.anon_key)
    for i, (token, reason) in enumerate([
        (keys.user_token(str(world.alice), world.secret + "x"),
         "JwtSignatureError: Failed to validate JWT signature"),
        ("garbage", "MalformedJWT: The token provided is not a valid JWT"),
    ]):
        topic = f"realtime:refused-{i}"
        await c.send(topic, "phx_join", {"config": {}, "access_token": token}, "9", "9")
        reply = await c.recv_until(is_event("phx_reply"))
        assert reply["payload"] == {"status": "error", "response": {"reason": reason}}


async def test_opaque_keys_act_as_anon_and_service_role(
    rt_server: RealtimeServer, world: World, session: aiohttp.ClientSession,
    clients: list[PyClient],
) -> None:
    topic = f"rt-org:{world.org_a}"
    secret = PyClient(rt_server.url, keys.LOCAL_SECRET_KEY)
    publishable = PyClient(rt_server.url, keys.LOCAL_PUBLISHABLE_KEY)
    clients += [secret, publishable]
    await secret.client.connect()
    await publishable.client.connect()
    # service_role bypasses the realtime.messages policies; anon has none.
    ch = secret.channel(topic, {"private": True})
    secret.on_broadcast(ch)
    assert await secret.subscribe(ch) == "SUBSCRIBED"
    assert await publishable.subscribe(publishable.channel(topic, {"private": True})) in (
        "CHANNEL_ERROR", "TIMED_OUT")
    assert "Unauthorized" in publishable.last_status["err"]
    url = f"{rt_server.url}/realtime/v1/api/broadcast"
    message = {"messages": [{"topic": topic, "event": "e", "payload": {"n": 1},
                             "private": True}]}
    async with session.post(url, json=message, headers={"apikey": "sb_secret_nope"}) as resp:
        assert resp.status == 401
        assert (await resp.json())["message"] == "Invalid API key"
    async with session.post(url, json=message,
                            headers={"apikey": keys.LOCAL_SECRET_KEY}) as resp:
        assert resp.status == 202
    ev = await secret.events.wait(kind("bc"))
    assert ev["payload"]["payload"] == {"n": 1}
    # The anon key may not write to the private topic: accepted, but not delivered; the
    # service_role broadcast after it is the witness.
    for key, n in ((keys.LOCAL_PUBLISHABLE_KEY, 2), (keys.LOCAL_SECRET_KEY, 3)):
        message["messages"][0]["payload"] = {"n": n}
        async with session.post(url, data=json.dumps(message), headers={
                "apikey": key, "Content-Type": "application/json"}) as resp:
            assert resp.status == 202
    await secret.events.none_before(
        lambda e: e.get("payload", {}).get("payload") == {"n": 2},
        lambda e: e.get("kind") == "bc" and e["payload"]["payload"] == {"n": 3})
