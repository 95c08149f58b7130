"""Phoenix frame (de)serialisation for vsn 1.0.0 and 2.0.0.

Clients choose the serializer with the `vsn` query parameter. The Python `realtime` 2.34
client speaks 1.0.0 (JSON objects) and silently drops anything not shaped exactly like
Phoenix's V1 output (four keys: topic, event, payload, ref). realtime-js speaks 2.0.0: JSON
arrays `[join_ref, ref, topic, event, payload]` plus binary frames for broadcasts (kind 3
client->server, kind 4 server->client).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

VSN_1 = "1.0.0"
VSN_2 = "2.0.0"

KIND_USER_BROADCAST_PUSH = 3
KIND_USER_BROADCAST = 4
ENCODING_BINARY = 0
ENCODING_JSON = 1


class FrameError(ValueError):
    """A frame that does not decode; Phoenix logs and drops it, keeping the connection."""


@dataclass
class Message:
    """The logical Phoenix message, independent of the serializer."""

    topic: str
    event: str
    payload: Any
    ref: str | None = None
    join_ref: str | None = None


@dataclass
class UserBroadcast:
    """A broadcast whose user payload travels as raw bytes (binary kind 3 / kind 4).

    Kept undecoded so that a V2 sender's bytes reach V2 receivers unchanged, as in Supabase.
    """

    topic: str
    join_ref: str | None
    ref: str | None
    user_event: str
    metadata: dict[str, Any] = field(default_factory=dict)
    encoding: int = ENCODING_JSON
    body: bytes = b""

    def json_payload(self) -> Any:
        """The user payload as JSON (for V1 receivers); FrameError for binary payloads."""
        if self.encoding != ENCODING_JSON:
            raise FrameError("binary broadcast payloads cannot be sent to vsn 1.0.0 clients")
        try:
            return json.loads(self.body) if self.body else None
        except ValueError as exc:
            raise FrameError(f"broadcast body is not JSON: {exc}") from exc


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class Serializer:
    """Interface: both versions decode to `Message` or `UserBroadcast`."""

    vsn: str = ""

    def decode(self, data: str | bytes) -> Message | UserBroadcast:
        raise NotImplementedError

    def encode(self, msg: Message) -> str:
        raise NotImplementedError

    def encode_user_broadcast(self, ub: UserBroadcast, topic: str) -> str | bytes:
        raise NotImplementedError


class V1Serializer(Serializer):
    """JSON objects. Outbound frames carry exactly topic/event/payload/ref (no join_ref)."""

    vsn = VSN_1

    def decode(self, data: str | bytes) -> Message:
        if isinstance(data, bytes):
            raise FrameError("vsn 1.0.0 does not accept binary frames")
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise FrameError(f"not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise FrameError("vsn 1.0.0 frames must be JSON objects")
        try:
            topic, event, payload, ref = obj["topic"], obj["event"], obj["payload"], obj["ref"]
        except KeyError as exc:
            raise FrameError(f"missing key {exc}") from exc
        if not isinstance(topic, str) or not isinstance(event, str):
            raise FrameError("topic and event must be strings")
        join_ref = obj.get("join_ref")
        return Message(topic, event, payload, _ref(ref), _ref(join_ref))

    def encode(self, msg: Message) -> str:
        return _dumps(
            {"topic": msg.topic, "event": msg.event, "payload": msg.payload, "ref": msg.ref}
        )

    def encode_user_broadcast(self, ub: UserBroadcast, topic: str) -> str:
        payload: dict[str, Any] = {
            "type": "broadcast",
            "event": ub.user_event,
            "payload": ub.json_payload(),
        }
        if ub.metadata:
            payload["meta"] = ub.metadata
        return self.encode(Message(topic, "broadcast", payload))


class V2Serializer(Serializer):
    """JSON arrays for text frames; binary kind 3 in, kind 4 out for user broadcasts."""

    vsn = VSN_2

    def decode(self, data: str | bytes) -> Message | UserBroadcast:
        if isinstance(data, bytes):
            return self._decode_binary(data)
        try:
            arr = json.loads(data)
        except ValueError as exc:
            raise FrameError(f"not JSON: {exc}") from exc
        if not isinstance(arr, list) or len(arr) != 5:
            raise FrameError("vsn 2.0.0 text frames must be 5-element arrays")
        join_ref, ref, topic, event, payload = arr
        if not isinstance(topic, str) or not isinstance(event, str):
            raise FrameError("topic and event must be strings")
        return Message(topic, event, payload, _ref(ref), _ref(join_ref))

    @staticmethod
    def _decode_binary(data: bytes) -> UserBroadcast:
        if len(data) < 7 or data[0] != KIND_USER_BROADCAST_PUSH:
            raise FrameError("only binary user broadcast pushes (kind 3) are accepted")
        lens = list(data[1:6])
        encoding = data[6]
        pos = 7
        parts: list[str] = []
        for n in lens:
            chunk = data[pos : pos + n]
            if len(chunk) != n:
                raise FrameError("truncated binary frame")
            parts.append(chunk.decode("utf-8"))
            pos += n
        join_ref, ref, topic, user_event, meta = parts
        metadata: dict[str, Any] = {}
        if meta:
            try:
                parsed = json.loads(meta)
            except ValueError as exc:
                raise FrameError("broadcast metadata is not JSON") from exc
            if isinstance(parsed, dict):
                metadata = parsed
        return UserBroadcast(
            topic=topic,
            join_ref=join_ref or None,
            ref=ref or None,
            user_event=user_event,
            metadata=metadata,
            encoding=encoding,
            body=data[pos:],
        )

    def encode(self, msg: Message) -> str:
        return _dumps([msg.join_ref, msg.ref, msg.topic, msg.event, msg.payload])

    def encode_user_broadcast(self, ub: UserBroadcast, topic: str) -> bytes:
        t = topic.encode()
        e = ub.user_event.encode()
        m = _dumps(ub.metadata).encode() if ub.metadata else b""
        if max(len(t), len(e), len(m)) > 255:
            raise FrameError("topic, event and metadata must each fit in 255 bytes")
        header = bytes([KIND_USER_BROADCAST, len(t), len(e), len(m), ub.encoding])
        return header + t + e + m + ub.body


def _ref(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def serializer_for(vsn: str | None) -> Serializer | None:
    """The serializer for a `vsn` query value (absent means 1.0.0); None if unsupported."""
    if not vsn or vsn.startswith("1."):
        return V1Serializer()
    if vsn.startswith("2."):
        return V2Serializer()
    return None
