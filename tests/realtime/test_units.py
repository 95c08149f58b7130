"""Fast unit tests of the pure parts: serializers, filters, value conversion, JWT checks."""

from __future__ import annotations

import json
import uuid

import pytest

from devstack import keys
from devstack.realtime.auth import AuthError, TokenVerifier
from devstack.realtime.filters import FilterError, matches_all, parse_filter
from devstack.realtime.serializer import (
    FrameError,
    Message,
    UserBroadcast,
    V1Serializer,
    V2Serializer,
    serializer_for,
)
from devstack.realtime.values import commit_timestamp, parse_pg_array, to_json_value

SECRET = "unit-test-secret-with-at-least-32-characters"


def test_serializer_choice() -> None:
    assert isinstance(serializer_for(None), V1Serializer)
    assert isinstance(serializer_for("1.0.0"), V1Serializer)
    assert isinstance(serializer_for("2.0.0"), V2Serializer)
    assert serializer_for("3.0.0") is None


def test_v1_frames() -> None:
    s = V1Serializer()
    msg = s.decode('{"topic":"t","event":"e","payload":{},"ref":1,"join_ref":"2"}')
    assert msg == Message("t", "e", {}, "1", "2")
    assert json.loads(s.encode(Message("t", "e", {"a": 1}, None, "9"))) == {
        "topic": "t", "event": "e", "payload": {"a": 1}, "ref": None}
    with pytest.raises(FrameError):
        s.decode('{"topic":"t","event":"e","payload":{}}')  # `ref` key is required
    with pytest.raises(FrameError):
        s.decode(b"\x03")


def test_v2_binary_roundtrip() -> None:
    s = V2Serializer()
    parts = [b"1", b"22", b"realtime:r", b"ev", b'{"persist":true}']
    frame = bytes([3, *map(len, parts), 1]) + b"".join(parts) + b'{"x":1}'
    ub = s.decode(frame)
    assert isinstance(ub, UserBroadcast)
    assert (ub.join_ref, ub.ref, ub.topic, ub.user_event) == ("1", "22", "realtime:r", "ev")
    assert ub.metadata == {"persist": True} and ub.json_payload() == {"x": 1}
    out = s.encode_user_broadcast(ub, "realtime:r")
    assert isinstance(out, bytes) and out[0] == 4 and out.endswith(b'{"x":1}')
    assert json.loads(V1Serializer().encode_user_broadcast(ub, "realtime:r"))["payload"] == {
        "type": "broadcast", "event": "ev", "payload": {"x": 1}, "meta": {"persist": True}}
    raw = UserBroadcast("realtime:r", None, None, "ev", encoding=0, body=b"\x00\x01")
    with pytest.raises(FrameError):
        V1Serializer().encode_user_broadcast(raw, "realtime:r")
    with pytest.raises(FrameError):
        s.decode(bytes([1, 0, 0]))


def test_filters_are_typed_and_null_safe() -> None:
    types = {"id": "int8", "u": "uuid", "t": "text", "ts": "timestamptz", "p": "numeric"}
    u = uuid.uuid4()
    conds = parse_filter(f"u=eq.{str(u).upper()}", types)
    assert matches_all(conds, {"u": str(u)})
    assert matches_all(parse_filter("id=gt.9", types), {"id": 10})
    assert not matches_all(parse_filter("t=gt.9", types), {"t": "10"})  # text order
    assert matches_all(parse_filter("p=lt.10", types), {"p": 9.5})
    assert not matches_all(parse_filter("id=neq.1", types), {"id": None})
    assert not matches_all(parse_filter("id=eq.1", types), {"other": 1})
    assert matches_all(parse_filter("id=not.in.(1,2)", types), {"id": 3})
    assert matches_all(parse_filter("ts=lt.2030-01-01T00:00:00Z", types),
                       {"ts": "2029-12-31T23:00:00-02:00"}) is False
    assert matches_all(parse_filter("id=gte.1,t=eq.a", types), {"id": 1, "t": "a"})
    for bad in ("id=eq.x", "nope=eq.1", "id=like.1", "id", "id=in.1,2"):
        with pytest.raises(FilterError):
            parse_filter(bad, types)
    assert parse_filter("  ", types) == []


def test_value_conversion() -> None:
    assert to_json_value("jsonb", '{"a": [1]}') == {"a": [1]}
    assert to_json_value("_text", '{a,"b c",NULL}') == ["a", "b c", None]
    assert to_json_value("_int4", "{1,2}") == [1, 2]
    assert to_json_value("timestamptz", "2026-01-02 03:04:05.5+00") == "2026-01-02T03:04:05.5+00:00"
    assert to_json_value("timestamp", "2026-01-02 03:04:05") == "2026-01-02T03:04:05"
    assert to_json_value("int4", 5) == 5 and to_json_value("text", None) is None
    assert commit_timestamp("2026-01-02 03:04:05.123456+00") == "2026-01-02T03:04:05.123Z"
    assert commit_timestamp("2026-01-02 05:04:05+02") == "2026-01-02T03:04:05.000Z"
    assert parse_pg_array("{{1},{2}}") is None


def test_token_checks() -> None:
    v = TokenVerifier(SECRET)
    assert v.verify(keys.api_key("anon", SECRET)).role == "anon"
    assert v.verify(" " + keys.user_token("u1", SECRET) + "\n").sub == "u1"
    cases = {
        keys.api_key("anon", SECRET, lifetime_s=-3): "Token has expired",
        keys.sign({"role": "anon"}, SECRET): "Fields `role` and `exp` are required in JWT",
        keys.api_key("anon", SECRET + "x"): "signature",
        None: "No api key provided",
    }
    for token, text in cases.items():
        with pytest.raises(AuthError) as err:
            v.verify(token)
        assert text in err.value.message
