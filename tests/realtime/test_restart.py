"""Outages: a server restart and a lost replication connection.

Delivery is at-most-once, like Supabase: clients re-join by themselves after a restart,
but changes committed while the server (or its slot) was away are never replayed.
"""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import pytest

from tests.realtime.conftest import World
from tests.realtime.helpers import JsClient, PyClient, js_type, kind
from tests.support.realtime import RealtimeServer

pytestmark = pytest.mark.timeout(120)


async def wait_healthy(server: RealtimeServer, wait_s: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    async with aiohttp.ClientSession() as s:
        while loop.time() < deadline:
            try:
                async with s.get(f"{server.url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("server did not become healthy again")


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
            await j.events.none(js_type("postgres_changes"), within=0.2)
        await p.events.none(kind("pg"), within=0.3)
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
        # What a PostgreSQL restart does to the server: its connections are cut.
        killed = await pg.fetchval(
            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
            "where application_name like 'planner_realtime%' and datname = $1", db_name)
        assert killed >= 1
        await asyncio.sleep(0.3)
        await wait_healthy(rt_server)
        await pg.execute("insert into rt_plain values (400, 'after reconnect', 0)")
        rec = (await p.events.wait(kind("pg"), wait_s=10))["payload"]["data"]["record"]
        assert rec["id"] == 400
    finally:
        await p.close()
