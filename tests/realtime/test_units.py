"""Fast unit tests of the pure parts: serializers, filters, value conversion, JWT checks."""

from __future__ import annotations

import json
import uuid

import pytest

from devstack import keys
from devstack.realtime.auth import AuthError, InvalidApiKey, TokenVerifier
from devstack.realtime.filters import (
    FilterError,
    FilterRejected,
    RawFilter,
    matches_all,
    parse_filter,
    parse_filters,
)
from devstack.realtime.limits import RateCounter, batch_refusal
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
        with pytest.raises((FilterError, FilterRejected)):
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
    # (token, join reason, HTTP status and body text of a refused connection)
    cases = [
        (keys.api_key("anon", SECRET, lifetime_s=-3),
         "InvalidJWTToken: Token has expired 3 seconds ago", 401, "Token has expired"),
        (keys.sign({"role": "anon"}, SECRET),
         "InvalidJWTToken: Fields `role` and `exp` are required in JWT", 401,
         "Fields `role` and `exp` are required in JWT"),
        (keys.api_key("anon", SECRET + "x"),
         "JwtSignatureError: Failed to validate JWT signature", 401,
         "Failed to validate JWT signature"),
        ("not-a-jwt", "MalformedJWT: The token provided is not a valid JWT", 401,
         "The token provided is not a valid JWT"),
        (None, "MissingAPIKey: API key is missing or not a valid string", 401,
         "API key is missing"),
        (keys.sign({"role": "anon", "exp": 4102444800, "iat": "x"}, SECRET),
         "Unknown Error on Channel", 500, "Error connecting to Realtime"),
    ]
    for token, reason, status, http in cases:
        with pytest.raises(AuthError) as err:
            v.verify(token)
        assert (err.value.reason, err.value.http_status, err.value.http_message) == (
            reason, status, http), token


def test_opaque_keys_map_to_roles() -> None:
    v = TokenVerifier(SECRET, {keys.LOCAL_PUBLISHABLE_KEY: "anon",
                               keys.LOCAL_SECRET_KEY: "service_role"})
    assert v.verify(keys.LOCAL_PUBLISHABLE_KEY).role == "anon"
    assert v.verify(keys.LOCAL_SECRET_KEY).role == "service_role"
    assert v.verify(keys.LOCAL_SECRET_KEY).seconds_left() > 3600
    with pytest.raises(InvalidApiKey):
        v.verify("sb_secret_not-this-stacks-key")
    with pytest.raises(InvalidApiKey):
        TokenVerifier(SECRET).verify(keys.LOCAL_SECRET_KEY)


def test_new_filter_operators() -> None:
    types = {"id": "int8", "t": "text", "b": "bool", "v": "varchar"}
    sql = {"id": "bigint", "v": "character varying", "t": "text", "b": "boolean"}

    def match(text: str, row: dict[str, object]) -> bool:
        return matches_all(parse_filter(text, types, sql), row)

    assert match("t=like.ab%", {"t": "abc"}) and not match("t=like.ab%", {"t": "xab"})
    assert match("t=like.a_c", {"t": "abc"}) and not match("t=like.A%", {"t": "abc"})
    assert match("t=ilike.A%", {"t": "abc"}) and match("t=not.ilike.x%", {"t": "abc"})
    assert match(r"t=like.50\%", {"t": "50%"}) and not match(r"t=like.50\%", {"t": "500"})
    assert match("t=match.^a.c$", {"t": "abc"}) and match("t=match.b", {"t": "abc"})
    assert not match("t=match.B", {"t": "abc"}) and match("t=imatch.B", {"t": "abc"})
    assert match("t=is.null", {"t": None}) and not match("t=is.null", {"t": "a"})
    assert match("t=not.is.null", {"t": "a"}) and not match("t=not.is.null", {"t": None})
    assert match("b=is.true", {"b": True}) and match("b=is.false", {"b": False})
    assert match("b=is.unknown", {"b": None}) and match("b=not.is.true", {"b": None})
    assert match("id=isdistinct.3", {"id": None}) and match("id=isdistinct.3", {"id": 4})
    assert not match("id=isdistinct.3", {"id": 3}) and match("id=not.isdistinct.3", {"id": 3})
    # NULL fails the other operators, negated or not (SQL's three-valued logic).
    assert not match("t=not.like.x%", {"t": None}) and not match("id=not.eq.1", {"id": None})
    rejected = {
        "v=like.a%": "operator like requires a text-compatible column type, got character "
                     "varying",
        "id=match.1": "operator match requires a text-compatible column type, got bigint",
        "id=is.true": "is true filter requires a boolean column, got bigint",
        "id=is.maybe": "invalid value for is filter: must be null, true, false, or unknown",
        "t=match.(": "invalid regular expression for match filter",
        "zz=eq.1": "invalid column for filter zz",
        "id=eq.x": 'invalid input syntax for type bigint: "x"',
    }
    for text, message in rejected.items():
        with pytest.raises(FilterRejected) as err:
            parse_filter(text, types, sql)
        assert message in str(err.value), text


def test_filter_parse_errors_are_hosted_reasons() -> None:
    reasons = {
        "undefined": '["undefined"]',
        "t=foo.hey": '["foo", "hey"]',
        "id=eq": '["eq"]',
        "id=in.1": "`in` filter value must be wrapped by parentheses",
        "id=eq.1,,t=eq.a": "filter must not contain empty segments (check for extra commas)",
    }
    for text, reason in reasons.items():
        with pytest.raises(FilterError) as err:
            parse_filters(text)
        assert str(err.value) == reason, text
    assert parse_filters('t=in.("a,b",c),id=not.like."x,y"') == [
        RawFilter("t", "in", '("a,b",c)', False), RawFilter("id", "like", "x,y", True)]


def test_rate_counter_semantics() -> None:
    rc = RateCounter("t", limit=10, tick_s=1.0)
    rc.add(10)
    rc.tick()  # one reading: the burst counts fully
    assert rc.triggered and rc.avg == 10
    assert batch_refusal(rc, 1) == "Too many messages to broadcast, please reduce the batch size"
    rc.add(30)
    rc.tick()
    assert rc.avg == 20 and batch_refusal(rc, 1) == "You have exceeded your rate limit"
    for _ in range(12):
        rc.tick()
    assert not rc.triggered and rc.avg == 0 and batch_refusal(rc, 10) is None
    assert batch_refusal(rc, 11) is not None
