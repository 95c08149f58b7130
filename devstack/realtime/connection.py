"""One WebSocket connection speaking Phoenix channels, as Supabase Realtime does.

Semantics copied from Phoenix 1.8 / Supabase Realtime (see docs/realtime.md):
heartbeat replies on topic `phoenix`; `phx_join` with an ok reply echoing postgres_changes
bindings plus ids; failed joins answered after a back-off; duplicate joins replaced (reply to
the new join, then `phx_close` with the old join_ref); `phx_leave` -> ok reply then
`phx_close`; pushes to unjoined topics -> `unmatched topic`; stale join_refs dropped;
`access_token` refreshes without a reply; token expiry -> `system` error and `phx_close`.

All outbound frames go through one queue drained by a writer task, so order is preserved and
fan-out from other connections never blocks on this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import zlib
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, WSMsgType, web
from loguru import logger

from devstack.realtime.auth import AuthError, Identity
from devstack.realtime.changes import SubscriptionError
from devstack.realtime.channel import Channel, flexible_bool
from devstack.realtime.serializer import FrameError, Message, Serializer, UserBroadcast

if TYPE_CHECKING:
    from devstack.realtime.app import Server


def binding_id(entry: dict[str, Any]) -> int:
    """A stable, non-zero id < 2^27 for a postgres_changes entry (clients test it truthy)."""
    h = zlib.crc32(json.dumps(entry, sort_keys=True, default=str).encode()) % (1 << 27)
    return h or 1


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


class Connection:
    """A client socket: its serializer, connection identity and joined channels."""

    def __init__(
        self,
        server: Server,
        ws: web.WebSocketResponse,
        serializer: Serializer,
        identity: Identity,
        peer: str,
    ) -> None:
        self.server = server
        self.ws = ws
        self.serializer = serializer
        self.identity = identity
        self.peer = peer
        self.channels: dict[str, Channel] = {}
        self.out: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- sending ---------------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        self.out.put_nowait(self.serializer.encode(msg))

    def send_frame(self, frame: str | bytes) -> None:
        self.out.put_nowait(frame)

    async def writer(self) -> None:
        while True:
            frame = await self.out.get()
            if frame is None:
                return
            try:
                if isinstance(frame, bytes):
                    await self.ws.send_bytes(frame)
                else:
                    await self.ws.send_str(frame)
            except (ConnectionError, RuntimeError):
                return

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle -------------------------------------------------------------------------
    async def serve(self) -> None:
        writer = asyncio.create_task(self.writer())
        idle = self.server.idle_timeout_s
        try:
            while True:
                try:
                    raw = await self.ws.receive(timeout=idle if idle > 0 else None)
                except TimeoutError:
                    # Phoenix (cowboy's idle_timeout): close 1000, empty reason, after
                    # `timeout` without any frame from the client; our pushes do not count.
                    logger.info("{}: idle for {:.1f}s, closing", self.peer, idle)
                    await self.ws.close(code=WSCloseCode.OK, message=b"")
                    break
                if raw.type == WSMsgType.TEXT:
                    data: str | bytes = raw.data
                elif raw.type == WSMsgType.BINARY:
                    data = raw.data
                elif raw.type == WSMsgType.PING:
                    await self.ws.pong(raw.data)
                    continue
                elif raw.type == WSMsgType.PONG:
                    continue
                else:
                    break
                try:
                    decoded = self.serializer.decode(data)
                except FrameError as exc:
                    logger.warning("{}: malformed frame dropped: {}", self.peer, exc)
                    continue
                try:
                    await self.handle(decoded)
                except Exception:
                    logger.exception("{}: error handling a frame", self.peer)
        finally:
            for ch in list(self.channels.values()):
                self.close_channel(ch)
            for task in list(self._tasks):
                task.cancel()
            self.out.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 2)

    def close_channel(self, ch: Channel) -> None:
        """Forget a channel everywhere (hub, postgres bindings, expiry timer)."""
        if ch.closed:
            return
        ch.closed = True
        if self.channels.get(ch.topic) is ch:
            del self.channels[ch.topic]
        if ch.expiry is not None:
            ch.expiry.cancel()
        self.server.hub.leave(ch)
        self.server.changes.unsubscribe(ch)

    def shutdown_channel(self, ch: Channel, message: str) -> None:
        """Channel-level shutdown: `system` error, then `phx_close` (as Supabase)."""
        ch.system("system", "error", message)
        self.close_channel(ch)
        ch.push_close()
        logger.info("{}: channel {} shut down: {}", self.peer, ch.topic, message)

    # -- inbound ---------------------------------------------------------------------------
    async def handle(self, msg: Message | UserBroadcast) -> None:
        if isinstance(msg, UserBroadcast):
            ch = self.channels.get(msg.topic)
            if ch is None:
                self.send(Message(msg.topic, "phx_reply",
                                  {"status": "error", "response": {"reason": "unmatched topic"}},
                                  msg.ref, msg.join_ref))
                return
            if msg.join_ref is not None and msg.join_ref != ch.join_ref:
                return
            await self.on_broadcast(ch, msg, msg.ref)
            return
        if msg.topic == "phoenix":
            if msg.event == "heartbeat":
                self.send(Message("phoenix", "phx_reply", {"status": "ok", "response": {}},
                                  msg.ref, None))
            return
        if msg.event == "phx_join":
            await self.join(msg)
            return
        ch = self.channels.get(msg.topic)
        if ch is None:
            if msg.event == "phx_leave":
                self.send(Message(msg.topic, "phx_reply", {"status": "ok", "response": {}},
                                  msg.ref, msg.join_ref))
            else:
                self.send(Message(msg.topic, "phx_reply",
                                  {"status": "error", "response": {"reason": "unmatched topic"}},
                                  msg.ref, msg.join_ref))
            return
        if msg.join_ref is not None and msg.join_ref != ch.join_ref:
            return  # stale incarnation, as Phoenix drops it
        payload = msg.payload if isinstance(msg.payload, dict) else {}
        if msg.event == "phx_leave":
            ch.reply(msg.ref, "ok", {})
            self.close_channel(ch)
            ch.push_close()
        elif msg.event == "access_token":
            await self.on_access_token(ch, payload)
        elif msg.event == "broadcast":
            await self.on_broadcast(ch, payload, msg.ref)
        elif msg.event == "presence":
            await self.on_presence(ch, payload, msg.ref)
        else:
            # Hosted counts unexpected client events against the tenant's rate.
            self.server.events.add()
            logger.info("{}: ignoring event {} on {}", self.peer, msg.event, msg.topic)

    async def join(self, msg: Message) -> None:
        topic = msg.topic
        ref = msg.ref
        join_ref = msg.join_ref or ref
        if not topic.startswith("realtime:"):
            self.send(Message(topic, "phx_reply",
                              {"status": "error", "response": {"reason": "unmatched topic"}},
                              ref, join_ref))
            return
        payload: dict[str, Any] = msg.payload if isinstance(msg.payload, dict) else {}
        raw_config = payload.get("config")
        config: dict[str, Any] = raw_config if isinstance(raw_config, dict) else {}
        sub_topic = topic.split(":", 1)[1]

        def refuse(reason: str) -> None:
            delay = self.server.channel_error_backoff_s
            logger.info("{}: join {} refused: {}", self.peer, topic, reason)
            reply = Message(topic, "phx_reply",
                            {"status": "error", "response": {"reason": reason}}, ref, join_ref)

            async def later() -> None:
                await asyncio.sleep(delay)
                self.send(reply)

            self._spawn(later())

        if not sub_topic:
            refuse("TopicNameRequired: You must provide a topic name")
            return
        if self.server.private_only and not flexible_bool(config.get("private")):
            refuse("PrivateOnly: This project only allows private channels")
            return
        token = payload.get("access_token") or payload.get("user_token")
        if not isinstance(token, str) or token.startswith("sb_"):
            token = self.identity.token
        try:
            identity = self.server.verifier.verify(token)
        except AuthError as exc:
            refuse(exc.reason)
            return

        broadcast_cfg = _section(config, "broadcast")
        presence_cfg = _section(config, "presence")
        private = flexible_bool(config.get("private"))
        readable = {"broadcast", "presence"}
        if private:
            try:
                readable = await self.server.db.channel_read(
                    identity.claims, sub_topic, ["broadcast", "presence"]
                )
            except Exception as exc:
                logger.warning("{}: private channel check failed: {}", self.peer, exc)
                refuse("Unknown Error on Channel")
                return
            if not readable:
                refuse(
                    "Unauthorized: You do not have permissions to read from this Channel "
                    f"topic: {sub_topic}"
                )
                return

        old = self.channels.get(topic)
        if old is not None:
            self.close_channel(old)

        pg_entries = config.get("postgres_changes")
        pg_entries = pg_entries if isinstance(pg_entries, list) else []
        with_ids = [
            {**e, "id": binding_id(e)} if isinstance(e, dict) else e for e in pg_entries
        ]
        key = presence_cfg.get("key")
        ch = Channel(
            conn=self,
            topic=topic,
            join_ref=join_ref,
            identity=identity,
            private=private,
            broadcast_self=flexible_bool(broadcast_cfg.get("self")),
            broadcast_ack=flexible_bool(broadcast_cfg.get("ack")),
            presence_enabled=flexible_bool(presence_cfg.get("enabled")),
            pg_changes=with_ids,
            readable=readable,
        )
        if isinstance(key, str) and key:
            ch.presence_key = key
        self.channels[topic] = ch
        self.server.hub.join(ch)
        ch.reply(ref, "ok", {"postgres_changes": with_ids})
        if old is not None:
            self.send(Message(topic, "phx_close", {}, old.join_ref, old.join_ref))
        if ch.presence_enabled and "presence" in readable:
            ch.push("presence_state", self.server.hub.state(ch.group))
        self._schedule_expiry(ch)
        logger.info("{}: joined {} as {} (private={}, bindings={})",
                    self.peer, topic, identity.role, private, len(with_ids))
        if with_ids:
            self._spawn(self.subscribe_changes(ch))

    async def subscribe_changes(self, ch: Channel) -> None:
        try:
            await self.server.changes.subscribe(ch, ch.pg_changes)
        except SubscriptionError as exc:
            if not ch.closed:
                ch.system("postgres_changes", "error", str(exc))
            return
        except Exception as exc:
            logger.warning("{}: postgres_changes subscription failed: {}", self.peer, exc)
            if not ch.closed:
                ch.system("postgres_changes", "error", "Unable to subscribe to changes")
            return
        if not ch.closed:
            ch.system("postgres_changes", "ok", "Subscribed to PostgreSQL")

    def _schedule_expiry(self, ch: Channel) -> None:
        if ch.expiry is not None:
            ch.expiry.cancel()
        loop = asyncio.get_running_loop()
        ch.expiry = loop.call_later(
            max(ch.identity.seconds_left(), 0) + 0.05,
            lambda: None if ch.closed else self.shutdown_channel(
                ch, f"Token has expired {max(int(-ch.identity.seconds_left()), 0)} seconds ago"
            ),
        )

    async def on_access_token(self, ch: Channel, payload: dict[str, Any]) -> None:
        token = payload.get("access_token")
        if not isinstance(token, str) or token.startswith("sb_") or token == ch.identity.token:
            return
        try:
            identity = self.server.verifier.verify(token)
        except AuthError as exc:
            self.shutdown_channel(ch, exc.refresh_message)
            return
        ch.identity = identity
        ch.can_write.clear()
        self._schedule_expiry(ch)
        if ch.private:
            readable = await self.server.db.channel_read(
                identity.claims, ch.sub_topic, ["broadcast", "presence"]
            )
            if not readable:
                self.shutdown_channel(
                    ch,
                    "You no longer have permission to read from this Channel topic: "
                    + ch.sub_topic,
                )
                return
            ch.readable = readable
        logger.info("{}: token refreshed on {} (role {})", self.peer, ch.topic, identity.role)
        if ch.pg_changes:
            self._spawn(self.subscribe_changes(ch))

    async def _may_write(self, ch: Channel, extension: str) -> bool:
        if not ch.private:
            return True
        if extension not in ch.can_write:
            try:
                ch.can_write[extension] = await self.server.db.channel_write(
                    ch.claims, ch.sub_topic, extension
                )
            except Exception as exc:
                logger.warning("{}: write policy check failed: {}", self.peer, exc)
                return False
        return ch.can_write[extension]

    async def on_broadcast(
        self, ch: Channel, payload: dict[str, Any] | UserBroadcast, ref: str | None
    ) -> None:
        if not await self._may_write(ch, "broadcast"):
            logger.debug("{}: broadcast on {} dropped (write denied)", self.peer, ch.topic)
            return
        if isinstance(payload, UserBroadcast):
            message: dict[str, Any] | UserBroadcast = payload
        else:
            keep = ("type", "event", "payload", "meta")
            message = {k: v for k, v in payload.items() if k in keep}
            message.setdefault("type", "broadcast")
        self.server.hub.broadcast(ch.group, message, sender=ch, include_sender=ch.broadcast_self)
        if ch.broadcast_ack:
            ch.reply(ref, "ok", {})

    async def on_presence(self, ch: Channel, payload: dict[str, Any], ref: str | None) -> None:
        event = str(payload.get("event", "")).lower()
        if event == "track":
            body = payload.get("payload", {})
            if not isinstance(body, dict):
                ch.reply(ref, "error", {"reason": "Presence track payload must be a map"})
                return
            if not await self._may_write(ch, "presence"):
                ch.reply(ref, "error", {})
                return
            ch.presence_enabled = True
            self.server.hub.track(ch, body)
            ch.reply(ref, "ok", {})
        elif event == "untrack":
            self.server.hub.untrack(ch)
            ch.reply(ref, "ok", {})
        else:
            ch.reply(ref, "error", {})
