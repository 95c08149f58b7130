"""Conformance with the real `@supabase/realtime-js` (pinned in tests/js, vsn 2.0.0 default).

Each test starts `node tests/js/rt_client.mjs` and drives it with JSON lines; broadcast and
presence tests mix it with the Python client (vsn 1.0.0) on the same topic.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from tests.realtime.conftest import World
from tests.realtime.helpers import JS_DIR, JsClient, Pred, PyClient, js_type, kind
from tests.support.realtime import RealtimeServer

pytestmark = [pytest.mark.timeout(90)]


def js_new(**fields: object) -> Pred:
    """A postgres_changes event whose new record has these fields."""
    def pred(e: dict[str, Any]) -> bool:
        new = e["payload"].get("new") or {} if e.get("type") == "postgres_changes" else {}
        return all(new.get(k) == v for k, v in fields.items())

    return pred


@pytest.mark.stack  # the npm packages come with `make test` (scripts/install-js.sh)
def test_realtime_js_is_installed():
    """`make test` installs the pinned realtime-js (scripts/install-js.sh); without it this
    file would prove nothing, so its absence is a failure, never a skip. The same `npm ci`
    installs the two supabase-js releases the UI snippet tests run
    (tests/listener/test_ui_snippet.py), each on the realtime-js it was released with."""
    assert JsClient.available(), "run `make js` (or `npm ci` in tests/js)"
    modules = JS_DIR / "node_modules"
    installed = {
        "@supabase/realtime-js": modules / "@supabase" / "realtime-js",
        "@supabase/supabase-js": modules / "@supabase" / "supabase-js",
        "supabase-js-on-pinned-realtime": modules / "supabase-js-on-pinned-realtime",
    }
    versions = {name: json.loads((path / "package.json").read_text())["version"]
                for name, path in installed.items()}
    lock = json.loads((JS_DIR / "package-lock.json").read_text())["packages"]
    assert versions == {name: lock[f"node_modules/{name}"]["version"] for name in installed}, \
        "tests/js/node_modules is not what package-lock.json pins: run `make js`"
    assert versions["supabase-js-on-pinned-realtime"] == versions["@supabase/realtime-js"]


@pytest.fixture
async def js(rt_server: RealtimeServer) -> AsyncIterator[list[JsClient]]:
    made: list[JsClient] = []
    yield made
    for c in made:
        await c.close()


@pytest.fixture
async def py(rt_server: RealtimeServer) -> AsyncIterator[list[PyClient]]:
    made: list[PyClient] = []
    yield made
    for c in made:
        await c.close()


async def start_js(js: list[JsClient], server: RealtimeServer, token: str, **kw: object
                   ) -> JsClient:
    c = JsClient(server.url, token, **kw)  # type: ignore[arg-type]
    js.append(c)
    await c.start()
    return c


async def test_postgres_changes_with_and_without_filter(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, js: list[JsClient]
) -> None:
    c = await start_js(js, rt_server, world.service_key)
    pg_spec = [
        {"event": "*", "schema": "public", "table": "rt_plain"},
        {"event": "INSERT", "schema": "public", "table": "rt_plain", "filter": "n=gte.5"},
    ]
    assert await c.channel("jsplain", pg=pg_spec) == "SUBSCRIBED"
    await c.events.wait(js_type("system"))
    await pg.execute("insert into rt_plain values (100, 'small', 1), (101, 'big', 50)")
    seen = [await c.events.wait(js_type("postgres_changes")) for _ in range(3)]
    payloads = [e["payload"] for e in seen]
    assert all(p["eventType"] == "INSERT" and p["old"] == {} for p in payloads)
    assert sorted(p["new"]["id"] for p in payloads) == [100, 101, 101]
    assert payloads[0]["commit_timestamp"].endswith("Z") and payloads[0]["errors"] is None
    await pg.execute("update rt_plain set label = 'x' where id = 100")
    p = (await c.events.wait(js_type("postgres_changes")))["payload"]
    assert p["eventType"] == "UPDATE" and p["new"]["label"] == "x"
    assert p["old"] == {"id": 100, "label": "small", "n": 1}
    await pg.execute("delete from rt_plain where id in (100, 101)")
    for _ in range(2):
        p = (await c.events.wait(js_type("postgres_changes")))["payload"]
        assert p["eventType"] == "DELETE" and p["new"] == {} and p["old"]["id"] in (100, 101)
    # Sentinel: a row only the unfiltered binding matches; no extra event may come first.
    await pg.execute("insert into rt_plain values (102, 'sentinel', 0)")
    got = await c.events.none_before(js_type("postgres_changes"), sentinel=js_new(id=102))
    assert got["payload"]["eventType"] == "INSERT"


async def test_rls_filtering_for_js_users(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, js: list[JsClient]
) -> None:
    alice = await start_js(js, rt_server, world.anon_key)
    await alice.cmd(cmd="setAuth", token=world.token(world.alice))
    await alice.events.wait(js_type("auth_set"))
    spec = [{"event": "INSERT", "schema": "public", "table": "rt_items"}]
    assert await alice.channel("jsrls", pg=spec) == "SUBSCRIBED"
    await alice.events.wait(js_type("system"))
    await pg.execute("insert into rt_items (organization_id, name) values ($1, 'B'), ($2, 'A')",
                     world.org_b, world.org_a)
    # B's row is dispatched before A's (same transaction, in order): A is the sentinel.
    p = (await alice.events.none_before(js_type("postgres_changes"),
                                        sentinel=js_new(name="A")))["payload"]
    assert p["new"]["name"] == "A"


async def test_broadcast_between_python_and_js(
    rt_server: RealtimeServer, world: World, js: list[JsClient], py: list[PyClient]
) -> None:
    j = await start_js(js, rt_server, world.anon_key)
    cfg = {"broadcast": {"self": True, "ack": True}}
    assert await j.channel("mixed", config=cfg, broadcast=["*"]) == "SUBSCRIBED"
    p = PyClient(rt_server.url, world.anon_key)
    py.append(p)
    ch = p.channel("mixed", {"broadcast": {"self": True, "ack": False}})
    p.on_broadcast(ch)
    assert await p.subscribe(ch) == "SUBSCRIBED"
    # JS -> Python (binary kind 3 in, converted to JSON for vsn 1), self and ack for JS.
    await j.cmd(cmd="send", name="mixed", event="from-js", payload={"v": 1})
    assert (await j.events.wait(js_type("send_result")))["result"] == "ok"
    got = await j.events.wait(js_type("broadcast"))
    assert got["payload"]["event"] == "from-js" and got["payload"]["payload"] == {"v": 1}
    assert (await p.events.wait(kind("bc")))["payload"] == {"event": "from-js", "payload": {"v": 1}}
    # Python -> JS, and Python hears itself (self: true).
    await ch.send_broadcast("from-py", {"v": 2})
    got = await j.events.wait(js_type("broadcast"))
    assert got["payload"]["event"] == "from-py" and got["payload"]["payload"] == {"v": 2}
    assert (await p.events.wait(kind("bc")))["payload"]["payload"] == {"v": 2}


async def test_presence_between_python_and_js(
    rt_server: RealtimeServer, world: World, js: list[JsClient], py: list[PyClient]
) -> None:
    j = await start_js(js, rt_server, world.anon_key)
    cfg = {"presence": {"key": "js-user"}}
    assert await j.channel("room-presence", config=cfg, presence=True) == "SUBSCRIBED"
    p = PyClient(rt_server.url, world.anon_key)
    py.append(p)
    ch = p.channel("room-presence", {"presence": {"key": "py-user", "enabled": True}})
    ch.on_presence_join(lambda key, cur, new: p.events.add({"kind": "join", "key": key}))
    assert await p.subscribe(ch) == "SUBSCRIBED"
    await j.cmd(cmd="track", name="room-presence", payload={"where": "js"})
    assert (await j.events.wait(js_type("track_result")))["result"] == "ok"
    await p.events.wait(kind("join", key="js-user"))
    await ch.track({"where": "py"})
    ev = await j.events.wait(
        lambda e: e.get("type") == "presence" and e.get("event") == "join"
        and e["payload"].get("key") == "py-user")
    assert ev["state"]["py-user"][0]["where"] == "py"
    assert ev["state"]["js-user"][0]["where"] == "js"


async def test_heartbeats_token_refresh_and_refusals(
    rt_server: RealtimeServer, world: World, js: list[JsClient]
) -> None:
    j = await start_js(js, rt_server, world.token(world.alice), heartbeat_ms=400)
    assert await j.channel("hb", watchHeartbeat=True, config={"broadcast": {"self": True}},
                           broadcast=["sentinel"]) == "SUBSCRIBED"
    for _ in range(2):
        await j.events.wait(js_type("heartbeat", status="ok"), wait_s=3)
    await j.cmd(cmd="setAuth", token=world.token(world.bob))
    await j.events.wait(js_type("auth_set"))
    # No error, no close: the server handles the socket's frames in order, so hearing our
    # own broadcast sent after the access_token push means the refresh was accepted.
    await j.cmd(cmd="send", name="hb", event="sentinel", payload={"after": "setAuth"})
    await j.events.none_before(
        js_type("status"),
        sentinel=lambda e: e.get("type") == "broadcast"
        and e["payload"].get("payload") == {"after": "setAuth"})
    # A private channel: refused to a non-member (bob), accepted for a member.
    topic = f"rt-org:{world.org_a}"
    status = await j.channel(topic, config={"private": True})
    assert status == "CHANNEL_ERROR"
    await j.cmd(cmd="unsubscribe", name=topic)
    a = await start_js(js, rt_server, world.anon_key)
    await a.cmd(cmd="setAuth", token=world.token(world.alice))
    await a.events.wait(js_type("auth_set"))
    assert await a.channel(topic, config={"private": True}) == "SUBSCRIBED"


async def test_js_with_vsn_1(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, js: list[JsClient]
) -> None:
    c = await start_js(js, rt_server, world.service_key, vsn="1.0.0")
    spec = [{"event": "INSERT", "schema": "public", "table": "rt_plain"}]
    assert await c.channel("v1js", pg=spec, config={"broadcast": {"self": True}},
                           broadcast=["b"]) == "SUBSCRIBED"
    await c.events.wait(js_type("system"))
    await pg.execute("insert into rt_plain values (200, 'v1', 0)")
    assert (await c.events.wait(js_type("postgres_changes")))["payload"]["new"]["id"] == 200
    await c.cmd(cmd="send", name="v1js", event="b", payload={"z": 1})
    assert (await c.events.wait(js_type("broadcast")))["payload"]["payload"] == {"z": 1}
