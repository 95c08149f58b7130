"""The aiohttp application: WebSocket endpoints, REST broadcast, health, lifecycle.

Routes (both the gateway paths clients build from SUPABASE_URL and the server's own):
    GET  /realtime/v1/websocket, /socket/websocket        Phoenix socket (vsn 1.0.0 / 2.0.0)
    POST /realtime/v1/api/broadcast, /api/broadcast        batch broadcast -> 202
    POST /realtime/v1/api/broadcast/{topic}/events/{event} single broadcast -> 202
    GET  /healthz                                          200 once the wal2json stream runs
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from aiohttp import WSCloseCode, web
from loguru import logger

from devstack.realtime.auth import (
    INVALID_API_KEY_BODY,
    AuthError,
    Identity,
    InvalidApiKey,
    TokenVerifier,
)
from devstack.realtime.changes import ChangeDispatcher
from devstack.realtime.channel import Channel
from devstack.realtime.connection import Connection
from devstack.realtime.database import Database
from devstack.realtime.db_broadcast import DatabaseBroadcasts
from devstack.realtime.hub import Hub
from devstack.realtime.limits import MAX_EVENTS_PER_SECOND, TICK_S, RateCounter, batch_refusal
from devstack.realtime.replication import ReplicationStream
from devstack.realtime.serializer import ENCODING_BINARY, UserBroadcast, serializer_for
from listener.backoff import Backoff

MAX_FRAME_BYTES = 5_000_000
# Phoenix's WebSocket transport closes a socket that received nothing for this long.
IDLE_TIMEOUT_S = 60.0
RATE_LIMITED = "Too many messages per second"


class Server:
    """Shared state of one server process, targeting one database."""

    def __init__(
        self,
        database_url: str,
        jwt_secret: str,
        *,
        connect_error_backoff_s: float = 2.0,
        channel_error_backoff_s: float = 5.0,
        opaque_keys: dict[str, str] | None = None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_events_per_second: float = MAX_EVENTS_PER_SECOND,
        rate_tick_s: float = TICK_S,
        private_only: bool = False,
    ) -> None:
        self.database_url = database_url
        #: A project with public channels disabled (hosted: Realtime settings, "Allow public
        #: access" off): joins without `config.private` are refused.
        self.private_only = private_only
        self.verifier = TokenVerifier(jwt_secret, opaque_keys)
        self.connect_error_backoff_s = connect_error_backoff_s
        self.channel_error_backoff_s = channel_error_backoff_s
        self.idle_timeout_s = idle_timeout_s
        self.events = RateCounter("events", max_events_per_second, rate_tick_s)
        self.db_events = RateCounter("postgres changes", max_events_per_second, rate_tick_s)
        self.db = Database(database_url)
        self.hub = Hub(on_delivered=self.count_delivery)
        self.changes = ChangeDispatcher(self.db, self.db_events)
        #: realtime.messages inserts (realtime.send) are broadcast; other changes dispatched
        self.db_broadcasts = DatabaseBroadcasts(self.hub, self.events, self.changes.on_change)
        self.connections: set[Connection] = set()
        self.stream: ReplicationStream | None = None
        self.db_ready = False
        self.started_at = time.time()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stream = ReplicationStream(
            self.database_url, loop, self.db_broadcasts.on_change, self._on_stream_state
        )
        self.stream.start()
        self.events.start()
        self.db_events.start()
        self._tasks.append(asyncio.create_task(self._open_db()))
        self._tasks.append(asyncio.create_task(self.changes.run()))

    async def _open_db(self) -> None:
        """Open the pool, retrying forever with jittered back-off (0.2 s to 5 s)."""
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self.db.open()
                self.db_ready = True
                logger.info("database pool ready")
                return
            except Exception as exc:  # any connect failure: keep retrying
                delay = backoff.next_delay()
                logger.warning("database not reachable ({}); retrying in {:.1f}s", exc, delay)
                await asyncio.sleep(delay)

    @staticmethod
    def _on_stream_state(streaming: bool) -> None:
        logger.info("replication stream {}", "running" if streaming else "down")

    async def stop(self) -> None:
        """Close every socket with 1001 (going away), stop the stream (drops the slot)."""
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        for task in self._tasks:
            task.cancel()
        await self.events.stop()
        await self.db_events.stop()
        if self.stream is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.stream.stop)
        await self.db.close()

    def count_delivery(self, ch: Channel) -> None:
        """A message reached a channel: count it; over the limit the channel is shut down
        (after the message, as hosted's channel process does on `:update_rate_counter`)."""
        self.events.add()
        if self.events.triggered and not ch.closed:
            ch.conn.shutdown_channel(ch, RATE_LIMITED)

    @property
    def healthy(self) -> bool:
        return bool(self.stream and self.stream.streaming and self.db_ready)

    # -- HTTP handlers ---------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        body = {
            "status": "ok" if self.healthy else "starting",
            "replication": "streaming" if self.stream and self.stream.streaming else "down",
            "slot": self.stream.slot_name if self.stream else None,
            "database": self.db_ready,
            "connections": len(self.connections),
            "changes_delivered": self.changes.delivered,
            "database_broadcasts": self.db_broadcasts.sent,
            # The rate counters' last averages and whether they are over the tenant limit.
            "rate": {
                name: {"avg": counter.avg, "limited": counter.triggered}
                for name, counter in (("events", self.events), ("db_events", self.db_events))
            },
        }
        return web.json_response(body, status=200 if self.healthy else 503)

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        serializer = serializer_for(request.query.get("vsn"))
        if serializer is None:
            return web.json_response({"error": "unsupported vsn"}, status=400)
        token = request.headers.get("x-api-key") or request.query.get("apikey")
        try:
            identity = self.verifier.verify(token)
        except InvalidApiKey:
            # Refused by the API gateway in front of hosted Realtime: no back-off there.
            logger.info("connection refused: unknown opaque API key")
            return web.json_response(INVALID_API_KEY_BODY, status=401)
        except AuthError as exc:
            logger.info("connection refused: {}", exc.reason)
            await asyncio.sleep(self.connect_error_backoff_s)
            return web.json_response({"error": exc.http_message}, status=exc.http_status)
        # Pings are answered by Connection.serve, so that they count as activity.
        ws = web.WebSocketResponse(autoping=False, max_msg_size=MAX_FRAME_BYTES)
        await ws.prepare(request)
        peer = f"{request.remote}#{id(ws) % 100000}"
        conn = Connection(self, ws, serializer, identity, peer)
        self.connections.add(conn)
        logger.info("{}: connected vsn={} role={}", peer, serializer.vsn, identity.role)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            logger.info("{}: disconnected", peer)
        return ws

    def _rest_identity(self, request: web.Request) -> Identity:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else None
        if not token or token.startswith("sb_"):
            token = request.headers.get("apikey") or request.query.get("apikey")
        return self.verifier.verify(token)

    async def _rest_send(
        self,
        identity: Identity,
        topic: str,
        private: bool,
        message: dict[str, Any] | UserBroadcast,
        allowed: dict[str, bool],
    ) -> None:
        if private:
            if topic not in allowed:
                allowed[topic] = await self.db.channel_write(identity.claims, topic, "broadcast")
            if not allowed[topic]:
                logger.debug("REST broadcast to private {} skipped (write denied)", topic)
                return
        self.events.add()  # hosted counts each accepted REST message once, plus deliveries
        self.hub.broadcast((topic, private), message)

    @staticmethod
    def _rest_refusal(exc: AuthError) -> web.Response:
        if isinstance(exc, InvalidApiKey):
            return web.json_response(INVALID_API_KEY_BODY, status=401)
        return web.json_response({"message": "Unauthorized"}, status=401)

    @staticmethod
    def _too_many(message: str) -> web.Response:
        logger.info("REST broadcast refused: {}", message)
        return web.json_response({"message": message}, status=429)

    async def broadcast_batch(self, request: web.Request) -> web.Response:
        try:
            identity = self._rest_identity(request)
        except AuthError as exc:
            return self._rest_refusal(exc)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"errors": {"messages": ["is invalid"]}}, status=422)
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            return web.json_response({"errors": {"messages": ["can't be blank"]}}, status=422)
        errors: list[dict[str, Any]] = []
        for m in messages:
            err: dict[str, list[str]] = {}
            if not isinstance(m, dict):
                errors.append({"message": ["is invalid"]})
                continue
            for key in ("topic", "event"):
                if not isinstance(m.get(key), str) or not m.get(key):
                    err[key] = ["can't be blank"]
            if not isinstance(m.get("payload"), dict):
                err["payload"] = ["is invalid"]
            if err:
                errors.append(err)
        if errors:
            return web.json_response({"errors": {"messages": errors}}, status=422)
        refusal = batch_refusal(self.events, len(messages))
        if refusal is not None:
            return self._too_many(refusal)
        allowed: dict[str, bool] = {}
        for m in messages:
            out: dict[str, Any] = {
                "type": "broadcast", "event": m["event"], "payload": m["payload"]
            }
            if m.get("id"):
                out["meta"] = {"id": m["id"]}
            private = m.get("private") in (True, "true")
            await self._rest_send(identity, m["topic"], private, out, allowed)
        return web.Response(status=202)

    async def broadcast_single(self, request: web.Request) -> web.Response:
        try:
            identity = self._rest_identity(request)
        except AuthError as exc:
            return self._rest_refusal(exc)
        topic = request.match_info["topic"]
        event = request.match_info["event"]
        private = request.query.get("private") == "true"
        ctype = request.content_type
        message: dict[str, Any] | UserBroadcast
        if ctype == "application/json":
            try:
                payload = await request.json()
            except ValueError:
                return web.json_response({"errors": {"payload": ["is invalid"]}}, status=422)
            message = {"type": "broadcast", "event": event, "payload": payload}
        elif ctype == "application/octet-stream":
            message = UserBroadcast(topic="realtime:" + topic, join_ref=None, ref=None,
                                    user_event=event, encoding=ENCODING_BINARY,
                                    body=await request.read())
        else:
            return web.json_response({"error": "unsupported content type"}, status=415)
        refusal = batch_refusal(self.events, 1)
        if refusal is not None:
            return self._too_many(refusal)
        await self._rest_send(identity, topic, private, message, {})
        return web.Response(status=202)


def build_app(server: Server) -> web.Application:
    app = web.Application(client_max_size=MAX_FRAME_BYTES)
    for prefix in ("/realtime/v1", ""):
        app.router.add_post(f"{prefix}/api/broadcast", server.broadcast_batch)
        app.router.add_post(
            f"{prefix}/api/broadcast/{{topic}}/events/{{event}}", server.broadcast_single
        )
    app.router.add_get("/realtime/v1/websocket", server.websocket)
    app.router.add_get("/socket/websocket", server.websocket)
    app.router.add_get("/healthz", server.healthz)
    return app


async def serve(server: Server, host: str, port: int, stop: asyncio.Event) -> None:
    """Run until `stop` is set, then shut down cleanly."""
    app = build_app(server)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await server.start()
    await site.start()
    logger.info("local Realtime listening on http://{}:{}", host, port)
    try:
        await stop.wait()
    finally:
        logger.info("shutting down")
        await server.stop()
        await runner.cleanup()
        logger.info("stopped")

