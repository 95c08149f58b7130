"""Broadcast fan-out and presence, per topic group (sub-topic, private).

Everything happens on the event loop; delivering means putting an encoded frame on each
receiver's outbound queue, so a slow client never delays the others. Frames are encoded
once per serializer version and shared by all receivers.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from loguru import logger

from devstack.realtime.channel import Channel
from devstack.realtime.serializer import FrameError, Message, UserBroadcast

Group = tuple[str, bool]


def _phx_ref() -> str:
    return "F" + secrets.token_urlsafe(12)


class Hub:
    """Members of each topic group and their presence metas."""

    def __init__(self, on_delivered: Callable[[Channel], None] | None = None) -> None:
        # Called after each broadcast reaches a channel (the server's rate limit hook).
        self.on_delivered = on_delivered
        self.members: dict[Group, set[Channel]] = defaultdict(set)
        # group -> channel -> (key, meta)
        self.presence: dict[Group, dict[Channel, tuple[str, dict[str, Any]]]] = defaultdict(dict)

    def join(self, ch: Channel) -> None:
        self.members[ch.group].add(ch)

    def leave(self, ch: Channel) -> None:
        group = ch.group
        members = self.members.get(group)
        if members is not None:
            members.discard(ch)
        self.untrack(ch)  # the others get the leave diff; the leaving channel does not
        if members is not None and not members:
            del self.members[group]
            self.presence.pop(group, None)

    # -- broadcast -------------------------------------------------------------------------
    def broadcast(
        self,
        group: Group,
        message: dict[str, Any] | UserBroadcast,
        sender: Channel | None = None,
        include_sender: bool = False,
    ) -> int:
        """Deliver to every member (minus the sender unless `self`); returns receivers."""
        topic = "realtime:" + group[0]
        cache: dict[str, str | bytes | None] = {}
        count = 0
        for ch in list(self.members.get(group, ())):
            if ch is sender and not include_sender:
                continue
            if "broadcast" not in ch.readable:
                continue
            ser = ch.conn.serializer
            if ser.vsn not in cache:
                try:
                    if isinstance(message, UserBroadcast):
                        cache[ser.vsn] = ser.encode_user_broadcast(message, topic)
                    else:
                        cache[ser.vsn] = ser.encode(Message(topic, "broadcast", message))
                except FrameError as exc:
                    logger.debug("broadcast not deliverable to vsn {}: {}", ser.vsn, exc)
                    cache[ser.vsn] = None
            frame = cache[ser.vsn]
            if frame is not None:
                ch.conn.send_frame(frame)
                count += 1
                if self.on_delivered is not None:
                    self.on_delivered(ch)
        return count

    # -- presence --------------------------------------------------------------------------
    def state(self, group: Group) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, meta in self.presence.get(group, {}).values():
            out.setdefault(key, {"metas": []})["metas"].append(meta)
        return out

    def _diff(self, group: Group, joins: dict[str, Any], leaves: dict[str, Any]) -> None:
        payload = {"joins": joins, "leaves": leaves}
        for ch in list(self.members.get(group, ())):
            if "presence" in ch.readable:
                ch.fanout("presence_diff", payload)

    def track(self, ch: Channel, payload: dict[str, Any]) -> None:
        group = ch.group
        metas = self.presence[group]
        previous = metas.get(ch)
        if previous is not None:
            old_meta = previous[1]
            if {k: v for k, v in old_meta.items() if k not in ("phx_ref", "phx_ref_prev")} == (
                payload
            ):
                return  # re-tracking the same payload is a no-op
            meta = {**payload, "phx_ref": _phx_ref(), "phx_ref_prev": old_meta["phx_ref"]}
            metas[ch] = (ch.presence_key, meta)
            self._diff(
                group,
                {ch.presence_key: {"metas": [meta]}},
                {ch.presence_key: {"metas": [old_meta]}},
            )
            return
        meta = {**payload, "phx_ref": _phx_ref()}
        metas[ch] = (ch.presence_key, meta)
        self._diff(group, {ch.presence_key: {"metas": [meta]}}, {})

    def untrack(self, ch: Channel) -> None:
        metas = self.presence.get(ch.group)
        if not metas or ch not in metas:
            return
        key, meta = metas.pop(ch)
        self._diff(ch.group, {}, {key: {"metas": [meta]}})
