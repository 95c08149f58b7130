"""Test plumbing for the Realtime conformance tests: event collectors for both real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from realtime import AsyncRealtimeChannel, AsyncRealtimeClient

from devstack.settings import REPO_ROOT
from tests.support.realtime import RealtimeServer

JS_DIR = REPO_ROOT / "tests" / "js"
Pred = Callable[[dict[str, Any]], bool]


class Events:
    """Everything a client saw, in order, with awaitable matching."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def add(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        self._changed.set()

    async def _index_of(self, pred: Pred, wait_s: float, what: str) -> int:
        """Index of the first (not yet consumed) event matching `pred`, waiting for it."""
        deadline = time.monotonic() + wait_s
        while True:
            for i, item in enumerate(self.items):
                if pred(item):
                    return i
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {wait_s}s; saw {self.items}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def after(self, pred: Pred, wait_s: float = 5.0) -> list[dict[str, Any]]:
        """The events that arrived after the first one matching `pred` (waited for); nothing
        is consumed."""
        return self.items[await self._index_of(pred, wait_s, "matching event") + 1:]

    async def wait(self, pred: Pred, wait_s: float = 5.0) -> dict[str, Any]:
        """The first (not yet consumed) event matching `pred`; it is consumed."""
        return self.items.pop(await self._index_of(pred, wait_s, "matching event"))

    async def none_before(
        self, forbidden: Pred, sentinel: Pred, wait_s: float = 10.0
    ) -> dict[str, Any]:
        """Assert that nothing `forbidden` arrived before the `sentinel` event; returns the
        sentinel (consumed).

        A negative check needs a witness, not a quiet time window: a window passes vacuously
        whenever delivery is merely slow. So the caller first does what must NOT reach this
        client, then causes an event that MUST reach it, on the same socket, after the server
        has decided about the first; once the sentinel is here, anything forbidden would
        already be here too. Earlier events that were not consumed count; the sentinel
        itself may match `forbidden`.

        That rests on the order in which devstack/realtime delivers, per socket:
        - each connection has one outbound FIFO queue drained by one writer task
          (socket.py, `Connection.out`/`writer`), and both clients (realtime-py, and
          realtime-js through tests/js/rt_client.mjs) run callbacks in arrival order;
        - postgres_changes are dispatched by one consumer strictly in commit order
          (changes.py, `ChangeDispatcher.run`): a change committed later is queued after an
          earlier one has been delivered or dropped (filter, RLS);
        - a broadcast is queued to every receiver synchronously while the server handles it
          (hub.py, `Hub.broadcast`): a REST broadcast before its 202 reply, a WebSocket one
          when its frame is handled, and one connection's frames are handled one at a time,
          in order (socket.py, `Connection.serve`).
        Broadcasts and postgres_changes take different paths and are not ordered with each
        other: use a sentinel of the same kind, or first witness that the server has handled
        the forbidden event (e.g. its sender hears its own later broadcast).
        """
        i = await self._index_of(sentinel, wait_s, "sentinel event")
        bad = [e for e in self.items[:i] if forbidden(e)]
        assert not bad, f"unexpected events before the sentinel {self.items[i]}: {bad}"
        return self.items.pop(i)


def kind(k: str, **fields: Any) -> Pred:
    def pred(item: dict[str, Any]) -> bool:
        return item.get("kind") == k and all(item.get(f) == v for f, v in fields.items())

    return pred


class PyClient:
    """The real `realtime` 2.34.1 client with its callbacks recorded as events."""

    def __init__(self, url: str, token: str, **kwargs: Any) -> None:
        self.client = AsyncRealtimeClient(f"{url}/realtime/v1", token, **kwargs)
        self.events = Events()
        self.last_status: dict[str, Any] = {}

    def channel(self, name: str, config: dict[str, Any] | None = None) -> AsyncRealtimeChannel:
        cfg = {
            "broadcast": {"self": False, "ack": False},
            "presence": {"key": "", "enabled": False},
            "private": False,
            **(config or {}),
        }
        return self.client.channel(name, {"config": cfg})

    def on_pg(self, ch: AsyncRealtimeChannel, event: str, table: str, **kw: Any) -> None:
        name = ch.topic.split(":", 1)[1]
        ch.on_postgres_changes(
            event, lambda p: self.events.add({"kind": "pg", "ch": name, "payload": p}),
            table=table, **kw,
        )

    def on_broadcast(self, ch: AsyncRealtimeChannel, event: str = "*") -> None:
        name = ch.topic.split(":", 1)[1]
        ch.on_broadcast(event, lambda p: self.events.add({"kind": "bc", "ch": name, "payload": p}))

    async def subscribe(self, ch: AsyncRealtimeChannel, wait_system: bool = False) -> str:
        """Join; returns the first status. With `wait_system`, also await the pg system ok."""
        name = ch.topic.split(":", 1)[1]
        ch.on_system(lambda p: self.events.add({"kind": "system", "ch": name, "payload": p}))
        await ch.subscribe(
            lambda st, err: self.events.add(
                {"kind": "status", "ch": name, "status": str(st.value), "err": str(err or "")}
            )
        )
        first = await self.events.wait(kind("status", ch=name), wait_s=8)
        self.last_status = first
        if wait_system and first["status"] == "SUBSCRIBED":
            await self.events.wait(kind("system", ch=name), wait_s=5)
        return str(first["status"])

    async def close(self) -> None:
        await self.client.close()


class Raw:
    """A bare WebSocket speaking Phoenix frames (vsn 1.0.0 objects or 2.0.0 arrays)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, vsn: str) -> None:
        self.ws = ws
        self.vsn = vsn

    async def send(self, topic: str, event: str, payload: Any, ref: str | None,
                   join_ref: str | None = None) -> None:
        if self.vsn == "1.0.0":
            await self.ws.send_str(json.dumps(
                {"topic": topic, "event": event, "payload": payload, "ref": ref,
                 "join_ref": join_ref}))
        else:
            await self.ws.send_str(json.dumps([join_ref, ref, topic, event, payload]))

    async def recv(self, wait_s: float = 5.0) -> Any:
        msg = await self.ws.receive(wait_s)
        if msg.type == aiohttp.WSMsgType.TEXT:
            return json.loads(msg.data)
        if msg.type == aiohttp.WSMsgType.BINARY:
            return msg.data
        raise AssertionError(f"socket ended: {msg}")

    async def recv_until(self, pred: Callable[[Any], bool], wait_s: float = 5.0) -> Any:
        """The first frame matching `pred` (earlier frames are skipped)."""
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching frame within {wait_s}s")
            frame = await self.recv(left)
            if pred(frame):
                return frame


async def connect(session: aiohttp.ClientSession, server: RealtimeServer, token: str,
                  vsn: str = "1.0.0", path: str = "/realtime/v1/websocket") -> Raw:
    url = f"ws://{server.host}:{server.port}{path}?apikey={token}&vsn={vsn}"
    return Raw(await session.ws_connect(url), vsn)


class JsClient:
    """`node tests/js/rt_client.mjs`: the pinned realtime-js, driven by JSON lines."""

    def __init__(
        self, url: str, token: str, vsn: str | None = None, heartbeat_ms: int = 5000
    ) -> None:
        self.heartbeat_ms = heartbeat_ms
        self.url = url
        self.token = token
        self.vsn = vsn
        self.events = Events()
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("node") is not None and (
            JS_DIR / "node_modules" / "@supabase" / "realtime-js"
        ).is_dir()

    async def start(self) -> None:
        args = [str(JS_DIR / "rt_client.mjs"), f"{self.url}/realtime/v1", self.token]
        if self.vsn:
            args.append(self.vsn)
        self.proc = await asyncio.create_subprocess_exec(
            "node", *args, cwd=str(JS_DIR), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "RT_HEARTBEAT_MS": str(self.heartbeat_ms)},
        )
        self._reader = asyncio.create_task(self._read())
        await self.events.wait(lambda e: e.get("type") == "ready", wait_s=10)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                self.events.add(json.loads(line))
            except ValueError:
                self.events.add({"type": "stdout", "line": line.decode(errors="replace")})

    async def cmd(self, **command: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()

    async def channel(self, name: str, **spec: Any) -> str:
        await self.cmd(cmd="channel", name=name, **spec)
        ev = await self.events.wait(
            lambda e: e.get("type") == "status" and e.get("name") == name, wait_s=10
        )
        return str(ev["status"])

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            try:
                await self.cmd(cmd="exit")
                await asyncio.wait_for(self.proc.wait(), 5)
            except (TimeoutError, ConnectionError, BrokenPipeError):
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()


def js_type(t: str, **fields: Any) -> Pred:
    def pred(item: dict[str, Any]) -> bool:
        return item.get("type") == t and all(item.get(f) == v for f, v in fields.items())

    return pred


__all__ = [
    "JS_DIR", "Events", "JsClient", "Path", "Pred", "PyClient", "Raw", "connect", "js_type",
    "kind",
]
