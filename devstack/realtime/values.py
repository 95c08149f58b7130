"""Column values: wal2json text -> the JSON Supabase sends, and typed comparison keys.

The real server casts every wal2json value back to its column type and emits
`to_jsonb(value)`: numbers and booleans stay JSON scalars, json/jsonb become nested JSON,
arrays become JSON arrays, timestamps become ISO 8601 with a `T`. Filters are evaluated in
SQL with both sides cast to the column type, so comparisons here coerce both sides to a
Python value of the same kind (numbers numerically, uuids case-insensitively, timestamps as
instants) rather than comparing strings.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

INT_TYPES = {"int2", "int4", "int8", "oid", "xid"}
FLOAT_TYPES = {"float4", "float8", "numeric", "money"}
JSON_TYPES = {"json", "jsonb"}
TS_TZ = "timestamptz"
TS = "timestamp"

_TZ_SHORT = re.compile(r"([+-]\d\d)$")


def _timestamptz_json(text: str) -> str:
    """'2026-11-28 11:43:02.58+00' -> '2026-11-28T11:43:02.58+00:00' (to_jsonb's form)."""
    out = text.replace(" ", "T", 1)
    return _TZ_SHORT.sub(r"\1:00", out)


def parse_pg_array(text: str) -> list[Any] | None:
    """A one-dimensional PostgreSQL array literal as a list of strings/None, else None."""
    if not (text.startswith("{") and text.endswith("}")):
        return None
    body = text[1:-1]
    if not body:
        return []
    if "{" in body:
        return None  # multi-dimensional: left as text
    items: list[Any] = []
    i, n = 0, len(body)
    while i <= n:
        if i < n and body[i] == '"':
            i += 1
            buf = []
            while i < n and body[i] != '"':
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(body[i])
                i += 1
            items.append("".join(buf))
            i += 2  # closing quote and comma
        else:
            j = body.find(",", i)
            j = n if j < 0 else j
            raw = body[i:j]
            items.append(None if raw == "NULL" else raw)
            i = j + 1
        if i > n:
            break
    return items


def _scalar_json(typname: str, value: Any) -> Any:
    if value is None:
        return None
    if typname in JSON_TYPES and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    if typname in INT_TYPES and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    if typname in FLOAT_TYPES and isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            return value
        return int(f) if f.is_integer() and "." not in value and "e" not in value else f
    if typname == "bool" and isinstance(value, str):
        return value in ("t", "true")
    if typname == TS_TZ and isinstance(value, str):
        return _timestamptz_json(value)
    if typname == TS and isinstance(value, str):
        return value.replace(" ", "T", 1)
    return value


def to_json_value(typname: str, value: Any) -> Any:
    """What `to_jsonb(value::type)` gives for a wal2json column value."""
    if typname.startswith("_") and isinstance(value, str):
        items = parse_pg_array(value)
        if items is None:
            return value
        return [_scalar_json(typname[1:], item) for item in items]
    return _scalar_json(typname, value)


def commit_timestamp(wal_ts: str | None) -> str | None:
    """wal2json's commit time -> `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC, as Supabase formats it."""
    if not wal_ts:
        return None
    try:
        dt = datetime.fromisoformat(wal_ts)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    dt = dt.astimezone(UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


class CoercionError(ValueError):
    """A filter value that cannot be cast to the column's type."""


def coerce(typname: str, value: Any) -> Any:
    """A comparable Python value of the column's type, for filter evaluation."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(
        value, dict | list) else str(value)
    try:
        if typname in INT_TYPES:
            return int(text)
        if typname in FLOAT_TYPES:
            return Decimal(text)
        if typname == "bool":
            low = text.strip().lower()
            if low in ("t", "true", "y", "yes", "on", "1"):
                return True
            if low in ("f", "false", "n", "no", "off", "0"):
                return False
            raise CoercionError(f"invalid input syntax for type boolean: {text!r}")
        if typname == "uuid":
            return uuid.UUID(text)
        if typname == TS_TZ:
            dt = datetime.fromisoformat(text)
            return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
        if typname == TS:
            return datetime.fromisoformat(text).replace(tzinfo=None)
        if typname == "date":
            return date.fromisoformat(text[:10])
        if typname in JSON_TYPES:
            return json.dumps(json.loads(text), sort_keys=True)
    except (ValueError, InvalidOperation, TypeError) as exc:
        raise CoercionError(f"invalid input syntax for type {typname}: {text!r}") from exc
    return text
