"""Broadcast from the database: rows inserted into `realtime.messages` reach the topic.

`realtime.send(payload, event, topic, private)` (and anything else that inserts a
`broadcast` row into `realtime.messages`) is how a database sends on a Realtime topic. Hosted
Realtime streams that table out of the WAL with a publication and slot of its own
(supabase/realtime `Tenants.ReplicationConnection`: every decoded INSERT into `realtime.messages`
or one of its daily partitions is broadcast to the subscribers of (topic, private), with
`meta: {"id": <message id>}`, after the tenant's events-per-second check). Here the
one wal2json stream already decodes every table, so the messages are picked out of it:

* only committed inserts arrive (the probe rows of private-channel authorisation are rolled
  back and never decoded), at most once, to the channels joined at that moment; there is no
  replay;
* private topics reach only channels whose join the `realtime.messages` read policies admitted
  (a channel joins the (topic, private) group only then), exactly like a client's broadcast;
* while the events-per-second average is over the limit, messages are dropped (hosted logs
  and skips them), otherwise each counts once, plus once per delivery (the channel's counter).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from loguru import logger

from devstack.realtime.hub import Hub
from devstack.realtime.limits import RateCounter

ChangeHandler = Callable[[dict[str, Any]], None]


def is_messages_table(schema: object, table: object) -> bool:
    """realtime.messages, or one of the daily partitions hosted creates (messages_2026_12_03)."""
    return schema == "realtime" and isinstance(table, str) and (
        table == "messages" or table.startswith("messages_"))


class DatabaseBroadcasts:
    """Splits the decoded stream: message rows are broadcast, the rest goes to `changes`."""

    def __init__(self, hub: Hub, events: RateCounter, changes: ChangeHandler) -> None:
        self._hub = hub
        self._events = events
        self._changes = changes
        #: messages delivered to at least the topic group (for /healthz and tests' curiosity)
        self.sent = 0

    def on_change(self, change: dict[str, Any]) -> None:
        """Every decoded change, on the loop (the replication thread, call_soon_threadsafe)."""
        if is_messages_table(change.get("schema"), change.get("table")):
            if change.get("action") == "I":
                self._send(change)
            return
        self._changes(change)

    def _send(self, change: dict[str, Any]) -> None:
        row = {c.get("name"): c.get("value") for c in change.get("columns") or []}
        if row.get("extension") != "broadcast":
            return  # presence rows are never broadcast
        topic, event, private, message_id = (
            row.get("topic"), row.get("event"), row.get("private"), row.get("id"))
        raw = row.get("payload")
        try:
            payload = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            payload = None
        if not (isinstance(topic, str) and isinstance(event, str) and isinstance(private, bool)
                and payload is not None):
            # hosted: "UnableToBroadcastChanges" (topic, event, private or payload missing)
            logger.warning("realtime.messages row {} not broadcast: topic, event, private and "
                           "payload are required", message_id)
            return
        if self._events.triggered:
            logger.info("broadcast from the database to {} dropped: rate limit", topic)
            return
        self._events.add()
        self._hub.broadcast((topic, private), {
            "type": "broadcast", "event": event, "payload": payload, "meta": {"id": message_id},
        })
        self.sent += 1
