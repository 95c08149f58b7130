"""Hosted's socket idle timeout and per-tenant rate limits, with small values so tests are quick.

Hosted: Phoenix closes a socket that sent nothing for 60 s (close 1000, empty reason);
`TENANT_MAX_EVENTS_PER_SECOND` (100) is enforced as the average of 12 readings of a counter
read every 5 s. Here the servers run with `--idle-timeout-ms`, `--max-events-per-second` and
`--rate-counter-tick-ms` lowered; the behaviour is the same (devstack/realtime/limits.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from realtime.exceptions import RealtimeHTTPError

from devstack.settings import DevSettings
from tests.realtime.conftest import World
from tests.realtime.helpers import PyClient, connect, kind
from tests.support.realtime import RealtimeServer

pytestmark = pytest.mark.timeout(90)

LIMIT = 20  # events per second
TICK_MS = 400  # readings; the limit applies to the last 12 (4.8 s)


@pytest.fixture(scope="module")
def idle_server(dev_settings: DevSettings, db_name: str, world: World) -> Iterator[RealtimeServer]:
    with RealtimeServer(dev_settings, db_name, extra_args=("--idle-timeout-ms", "700")) as s:
        yield s


@pytest.fixture(scope="module")
def limited_server(
    dev_settings: DevSettings, db_name: str, world: World
) -> Iterator[RealtimeServer]:
    with RealtimeServer(dev_settings, db_name, max_events_per_second=LIMIT,
                        extra_args=("--rate-counter-tick-ms", str(TICK_MS))) as s:
        yield s


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def rate(server: RealtimeServer) -> dict[str, Any]:
    with urllib.request.urlopen(f"{server.url}/healthz", timeout=2) as resp:
        return dict(json.load(resp)["rate"])


async def wait_rate(server: RealtimeServer, counter: str, limited: bool) -> None:
    """Wait (bounded) until the server's counter is or is not over the limit."""
    deadline = time.monotonic() + 10
    while rate(server)[counter]["limited"] != limited:
        assert time.monotonic() < deadline, rate(server)
        await asyncio.sleep(TICK_MS / 4000)


async def test_silent_socket_is_closed_and_a_talking_one_is_not(
    idle_server: RealtimeServer, world: World, session: aiohttp.ClientSession
) -> None:
    silent = await connect(session, idle_server, world.anon_key)
    talking = await connect(session, idle_server, world.anon_key)
    started = time.monotonic()
    msg = None
    while msg is None or msg.type not in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
        # The talking socket sends a heartbeat every 200 ms, well inside the timeout.
        await talking.send("phoenix", "heartbeat", {}, "hb")
        assert (await talking.recv())["payload"]["status"] == "ok"
        try:
            msg = await silent.ws.receive(0.2)
        except TimeoutError:
            msg = None
        assert time.monotonic() - started < 10, "silent socket never closed"
    assert silent.ws.close_code == 1000 and not msg.extra
    assert time.monotonic() - started >= 0.6
    await talking.send("phoenix", "heartbeat", {}, "last")
    assert (await talking.recv())["ref"] == "last"


async def test_rest_batches_over_the_limit_get_429(
    limited_server: RealtimeServer, world: World, session: aiohttp.ClientSession
) -> None:
    url = f"{limited_server.url}/realtime/v1/api/broadcast"
    headers = {"apikey": world.service_key}

    def batch(n: int) -> dict[str, Any]:
        return {"messages": [{"topic": "rest-limit", "event": "e", "payload": {"i": i}}
                             for i in range(n)]}

    # Each delivery counts too: with 8 subscribers a batch of 20 counts 180 events, over the
    # limit even averaged over a full window of 12 readings (180 / 12 / 0.4 s = 37.5/s).
    for i in range(8):
        sub = await connect(session, limited_server, world.service_key)
        await sub.send("realtime:rest-limit", "phx_join", {"config": {}}, str(i), str(i))
        assert (await sub.recv())["payload"]["status"] == "ok"
    await wait_rate(limited_server, "events", False)
    async with session.post(url, json=batch(LIMIT + 1), headers=headers) as resp:
        assert resp.status == 429
        assert await resp.json() == {
            "message": "Too many messages to broadcast, please reduce the batch size"}
    async with session.post(url, json=batch(LIMIT), headers=headers) as resp:
        assert resp.status == 202
    await wait_rate(limited_server, "events", True)
    async with session.post(url, json=batch(1), headers=headers) as resp:
        assert resp.status == 429
        assert await resp.json() == {"message": "You have exceeded your rate limit"}
    # What the official client's `http_send` (the single-message endpoint) makes of it.
    client = PyClient(limited_server.url, world.service_key)
    try:
        with pytest.raises(RealtimeHTTPError) as err:
            await client.channel("rest-limit").http_send("e", {"i": -1})
        assert (str(err.value), err.value.status) == ("You have exceeded your rate limit", 429)
    finally:
        await client.close()


async def test_channel_over_the_limit_is_shut_down(
    limited_server: RealtimeServer, world: World,
) -> None:
    receiver = PyClient(limited_server.url, world.service_key)
    sender = PyClient(limited_server.url, world.service_key)
    try:
        await receiver.client.connect()
        await sender.client.connect()
        rch = receiver.channel("flood")
        receiver.on_broadcast(rch)
        assert await receiver.subscribe(rch) == "SUBSCRIBED"
        sch = sender.channel("flood")
        assert await sender.subscribe(sch) == "SUBSCRIBED"
        deadline = time.monotonic() + 15
        shut = None
        i = 0
        while shut is None:
            assert time.monotonic() < deadline, receiver.events.items[-5:]
            for _ in range(10):
                await sch.send_broadcast("tick", {"i": i})
                i += 1
            await asyncio.sleep(TICK_MS / 2000)
            # realtime-py reports a `system` error through the subscribe callback.
            shut = next((e for e in receiver.events.items if e["kind"] == "status"
                         and e["status"] == "CHANNEL_ERROR"), None)
        assert json.loads(shut["err"]) == {"extension": "system", "status": "error",
                                           "message": "Too many messages per second",
                                           "channel": "flood"}
        # Then the channel is closed by the server (phx_close after the system message).
        closed = await receiver.events.wait(kind("status", ch="flood", status="CLOSED"))
        assert closed["err"] == ""
    finally:
        await receiver.close()
        await sender.close()


async def test_postgres_changes_are_skipped_while_over_the_limit(
    limited_server: RealtimeServer, world: World, pg: asyncpg.Connection,
) -> None:
    c = PyClient(limited_server.url, world.service_key)
    try:
        await c.client.connect()
        ch = c.channel("db-flood")
        c.on_pg(ch, "INSERT", "rt_plain")
        assert await c.subscribe(ch, wait_system=True) == "SUBSCRIBED"
        await wait_rate(limited_server, "db_events", False)
        # 200 changes: over the limit even averaged over 12 readings (200 / 12 / 0.4 s).
        await pg.execute(
            "insert into rt_plain select g, 'burst', g from generate_series(1, 200) g")
        for _ in range(200):
            await c.events.wait(kind("pg"))
        await wait_rate(limited_server, "db_events", True)
        await pg.execute("insert into rt_plain values (1001, 'dropped', 0)")
        await wait_rate(limited_server, "db_events", False)
        await pg.execute("insert into rt_plain values (1002, 'delivered', 0)")
        await c.events.none_before(
            lambda e: e.get("kind") == "pg"
            and e["payload"]["data"]["record"]["label"] == "dropped",
            lambda e: e.get("kind") == "pg"
            and e["payload"]["data"]["record"]["label"] == "delivered",
        )
    finally:
        await c.close()
