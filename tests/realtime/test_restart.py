"""Outages: a server restart and a lost replication connection.

Delivery is at-most-once, like Supabase: clients re-join by themselves after a restart,
but changes committed while the server (or its slot) was away are never replayed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.realtime.conftest import World
from tests.realtime.helpers import JsClient, PyClient, js_type, kind
from tests.support.realtime import RealtimeServer

pytestmark = pytest.mark.timeout(120)


async def health(server: RealtimeServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{server.url}/healthz") as resp:
        body: dict[str, Any] = await resp.json()
        return {**body, "http_status": resp.status}


async def wait_healthy(
    server: RealtimeServer, wait_s: float = 15.0, new_slot_after: str | None = None
) -> None:
    """Wait for /healthz 200; with `new_slot_after`, on a replication slot other than that
    one (each stream the server opens gets a new temporary slot: it has reconnected)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    last: dict[str, Any] = {}
    while loop.time() < deadline:
        try:
            last = await health(server)
            if last["http_status"] == 200 and last.get("slot") not in (None, new_slot_after):
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"server did not become healthy again (last /healthz: {last})")


async def test_clients_resubscribe_after_restart_without_replay(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection
) -> None:
    p = PyClient(rt_server.url, world.service_key, initial_backoff=0.5)
    j = JsClient(rt_server.url, world.service_key) if JsClient.available() else None
    try:
        ch = p.channel("restart")
        p.on_pg(ch, "INSERT", "rt_plain")
        assert await p.subscribe(ch, wait_system=True) == "SUBSCRIBED"
        if j is not None:
            await j.start()
            spec = [{"event": "INSERT", "schema": "public", "table": "rt_plain"}]
            assert await j.channel("restart", pg=spec) == "SUBSCRIBED"
            await j.events.wait(js_type("system"))

        rt_server.stop()
        await pg.execute("insert into rt_plain values (300, 'during outage', 0)")
        await asyncio.to_thread(rt_server.start)

        # Both clients notice, reconnect, re-join and get a fresh subscription.
        ev = await p.events.wait(kind("status", ch="restart"), wait_s=10)
        assert ev["status"] == "CHANNEL_ERROR"
        assert (await p.events.wait(kind("status", ch="restart"), wait_s=15))["status"] == (
            "SUBSCRIBED")
        await p.events.wait(kind("system", ch="restart"), wait_s=5)
        if j is not None:
            await j.events.wait(js_type("status", status="CHANNEL_ERROR"), wait_s=10)
            await j.events.wait(js_type("status", status="SUBSCRIBED"), wait_s=15)
            await j.events.wait(js_type("system"), wait_s=5)

        await pg.execute("insert into rt_plain values (301, 'after restart', 0)")
        rec = (await p.events.wait(kind("pg")))["payload"]["data"]["record"]
        assert rec["id"] == 301  # 300 is never replayed
        if j is not None:
            assert (await j.events.wait(js_type("postgres_changes")))["payload"]["new"]["id"] == 301
        # Nor later, nor twice: nothing else arrives before the next change (the sentinel).
        await pg.execute("insert into rt_plain values (302, 'sentinel', 0)")
        if j is not None:
            await j.events.none_before(
                js_type("postgres_changes"),
                sentinel=lambda e: e.get("type") == "postgres_changes"
                and e["payload"]["new"].get("id") == 302)
        await p.events.none_before(
            kind("pg"),
            sentinel=lambda e: e.get("kind") == "pg"
            and e["payload"]["data"].get("record", {}).get("id") == 302)
    finally:
        await p.close()
        if j is not None:
            await j.close()


async def test_replication_connection_loss_is_survived(
    rt_server: RealtimeServer, world: World, pg: asyncpg.Connection, db_name: str
) -> None:
    p = PyClient(rt_server.url, world.service_key)
    try:
        ch = p.channel("walsender")
        p.on_pg(ch, "INSERT", "rt_plain")
        assert await p.subscribe(ch, wait_system=True) == "SUBSCRIBED"
        slot = (await health(rt_server))["slot"]
        assert slot, "the server streams on a replication slot"
        # What a PostgreSQL restart does to the server: its connections are cut.
        killed = await pg.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name like 'planner_realtime%' and datname = $1", db_name)
        assert killed >= 1
        await wait_healthy(rt_server, new_slot_after=slot)  # streaming again, reconnected
        await pg.execute("insert into rt_plain values (400, 'after reconnect', 0)")
        rec = (await p.events.wait(kind("pg"), wait_s=10))["payload"]["data"]["record"]
        assert rec["id"] == 400
    finally:
        await p.close()
