"""One joined channel (`realtime:<sub-topic>`) on one WebSocket connection.

Holds what the join configured (broadcast self/ack, presence key, private, postgres
bindings) and the identity whose claims authorise it. Pushes go through the owning
connection's ordered outbound queue.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from devstack.realtime.auth import Identity
from devstack.realtime.serializer import Message

if TYPE_CHECKING:
    from devstack.realtime.connection import Connection


def flexible_bool(value: Any, default: bool = False) -> bool:
    """Supabase accepts booleans and the strings "true"/"false" in join configs."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        if value.lower() == "true":
            return True
        if value.lower() == "false":
            return False
    return default


@dataclass(eq=False)
class Channel:
    conn: Connection
    topic: str
    join_ref: str | None
    identity: Identity
    private: bool = False
    broadcast_self: bool = False
    broadcast_ack: bool = False
    presence_key: str = field(default_factory=lambda: str(uuid.uuid1()))
    presence_enabled: bool = False
    pg_changes: list[dict[str, Any]] = field(default_factory=list)
    readable: set[str] = field(default_factory=lambda: {"broadcast", "presence"})
    can_write: dict[str, bool] = field(default_factory=dict)
    expiry: asyncio.TimerHandle | None = None
    closed: bool = False

    @property
    def sub_topic(self) -> str:
        return self.topic.split(":", 1)[1]

    @property
    def group(self) -> tuple[str, bool]:
        """Fan-out group: public and private topics of the same name are distinct."""
        return (self.sub_topic, self.private)

    @property
    def claims(self) -> dict[str, Any]:
        return self.identity.claims

    def push(self, event: str, payload: Any) -> None:
        """A channel-originated push (system, presence_state, phx_close): carries join_ref."""
        self.conn.send(Message(self.topic, event, payload, None, self.join_ref))

    def push_close(self) -> None:
        """`phx_close`: Phoenix sends it with ref = join_ref (clients match on it)."""
        self.conn.send(Message(self.topic, "phx_close", {}, self.join_ref, self.join_ref))

    def fanout(self, event: str, payload: Any) -> None:
        """A fan-out push (broadcast, postgres_changes, presence_diff): join_ref null."""
        self.conn.send(Message(self.topic, event, payload, None, None))

    def reply(self, ref: str | None, status: str, response: Any) -> None:
        self.conn.send(
            Message(
                self.topic, "phx_reply", {"status": status, "response": response}, ref,
                self.join_ref,
            )
        )

    def system(self, extension: str, status: str, message: str) -> None:
        self.push(
            "system",
            {"extension": extension, "status": status, "message": message,
             "channel": self.sub_topic},
        )
