"""`postgres_changes` filter strings: parsing, validation and typed evaluation.

Grammar and checks follow supabase/realtime: `Extensions.PostgresCdcRls.Subscriptions`
(`parse_subscription_params/1`: `column=op.value`, an optional `not.` before the operator,
conditions joined by top-level commas meaning AND, `in.(a,b,"c,d")`), the trigger
`realtime.subscription_check_filters` (column must exist and be readable by the subscriber's
role, at most 100 `in` values, `is` only with null/true/false/unknown and non-null keywords
only on boolean columns, `like`/`ilike` only on types with a `~~` operator, `match`/`imatch`
only on types with a `~`/`~*` operator and a valid pattern, other values castable) and
`realtime.check_equality_op` (evaluation). Operators: eq, neq, lt, lte, gt, gte, in, like,
ilike, is, match, imatch, isdistinct.

Evaluation is SQL's: a NULL (or absent) column fails every operator, negated or not, except
`is` (`NULL IS NULL`) and `isdistinct` (`NULL IS DISTINCT FROM 1`). `match`/`imatch` patterns
are run with Python's `re`, which agrees with PostgreSQL's regular expressions on the common
syntax (classes, anchors, quantifiers, alternation, groups) but not on PostgreSQL-only escapes
such as `\\m`, `\\M`, `\\y`.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from devstack.realtime.values import CoercionError, coerce

COMPARISONS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}
FILTER_TYPES = (
    "eq", "neq", "lt", "lte", "gt", "gte", "in", "like", "ilike", "is", "match", "imatch",
    "isdistinct",
)
IS_KEYWORDS = ("null", "true", "false", "unknown")
# Built-in (and citext) types that have the operators the trigger looks for in pg_operator.
LIKE_TYPES = frozenset({"text", "name", "bpchar", "bytea", "citext"})  # `~~` with oprleft
REGEX_TYPES = frozenset({"text", "citext"})  # `~`/`~*` with oprleft = oprright = the type
MAX_IN_VALUES = 100


class FilterError(ValueError):
    """An unparsable filter string (Supabase: `Error parsing \\`filter\\` params: <reason>`)."""


class FilterRejected(ValueError):
    """A parsed filter the subscription trigger refuses; `str()` is the PostgreSQL error as
    Postgrex prints it (`ERROR P0001 (raise_exception) invalid column for filter x`)."""


def _raise_exception(message: str) -> FilterRejected:
    return FilterRejected(f"ERROR P0001 (raise_exception) {message}")


@dataclass(frozen=True)
class RawFilter:
    """One parsed condition before validation, as the server logs it."""

    column: str
    op: str
    value: str
    negate: bool

    def to_log(self) -> str:
        """Elixir's `inspect` of the tuple `{"col", "op", "value", false}`."""
        return (f"{{{json.dumps(self.column)}, {json.dumps(self.op)}, "
                f"{json.dumps(self.value)}, {str(self.negate).lower()}}}")


@dataclass(frozen=True)
class Condition:
    column: str
    op: str
    typname: str
    value: Any  # coerced; a tuple for `in`, a keyword for `is`, a compiled regex for matches
    negate: bool = False

    def matches(self, row: Mapping[str, Any]) -> bool:
        if self.column not in row:
            return False
        raw = row[self.column]
        if self.op == "is":
            return self._is(raw) != self.negate
        try:
            actual = None if raw is None else coerce(self.typname, raw)
        except CoercionError:
            return False
        if self.op == "isdistinct":
            return bool(actual != self.value) != self.negate
        if actual is None:
            return False
        result = self._compare(actual, raw)
        return not result if self.negate else result

    def _is(self, raw: Any) -> bool:
        if self.value == "null":
            return raw is None
        if self.value == "unknown":
            return raw is None
        if raw is None:
            return False
        try:
            return bool(coerce("bool", raw) is (self.value == "true"))
        except CoercionError:
            return False

    def _compare(self, actual: Any, raw: Any) -> bool:
        if self.op == "in":
            return actual in self.value
        if self.op in ("like", "ilike", "match", "imatch"):
            text = raw if isinstance(raw, str) else str(actual)
            return self.value.search(text) is not None
        try:
            return bool(COMPARISONS[self.op](actual, self.value))
        except TypeError:
            return False


def _split_top(text: str, prev: str = "") -> list[str]:
    """Split on commas outside parentheses and quotes (a quote opens only after . ( ,)."""
    parts: list[str] = []
    buf: list[str] = []
    depth, quoted, i = 0, False, 0
    while i < len(text):
        ch = text[i]
        if quoted:
            if ch == "\\" and i + 1 < len(text):
                buf += [ch, text[i + 1]]
                prev = text[i + 1]
                i += 2
                continue
            if ch == '"':
                quoted = False
            buf.append(ch)
        elif ch == '"' and prev in (".", "(", ","):
            quoted = True
            buf.append(ch)
        elif ch == "(":
            depth += 1
            buf.append(ch)
        elif ch == ")":
            depth = max(0, depth - 1)
            buf.append(ch)
        elif ch == "," and depth == 0:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        prev = ch
        i += 1
    parts.append("".join(buf))
    return parts


def _unquote(value: str) -> str:
    """`"a,b"` -> `a,b` (backslash escapes one character); anything else unchanged."""
    if not value.startswith('"'):
        return value
    out: list[str] = []
    i = 1
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out) if i == len(value) - 1 else value
        out.append(ch)
        i += 1
    return value


def _inspect(parts: list[str]) -> str:
    return "[" + ", ".join(json.dumps(p) for p in parts) + "]"


def parse_filters(text: str | None) -> list[RawFilter]:
    """The conditions of a filter string, or FilterError with hosted's reason."""
    if text is None or not text.strip():
        return []
    out: list[RawFilter] = []
    for segment in _split_top(text.strip()):
        seg = segment.strip()
        if not seg:
            raise FilterError("filter must not contain empty segments (check for extra commas)")
        column, eq, rest = seg.partition("=")
        if not eq:
            raise FilterError(_inspect([seg]))
        negate = rest.startswith("not.")
        op_value = rest[4:] if negate else rest
        op, dot, value = op_value.partition(".")
        if not dot:
            raise FilterError(_inspect([op_value]))
        if op not in FILTER_TYPES:
            raise FilterError(_inspect([op, value]))
        if op == "in":
            if not (len(value) >= 2 and value.startswith("(") and value.endswith(")")):
                raise FilterError("`in` filter value must be wrapped by parentheses")
        else:
            value = _unquote(value)
        out.append(RawFilter(column, op, value, negate))
    return out


def _cast(typname: str, sqltype: str, value: str) -> Any:
    try:
        return coerce(typname, value)
    except CoercionError as exc:
        raise FilterRejected(
            f"ERROR 22P02 (invalid_text_representation) invalid input syntax for type "
            f"{sqltype}: {json.dumps(value)}"
        ) from exc


def validate(
    raw: list[RawFilter],
    column_types: Mapping[str, str],
    sql_types: Mapping[str, str],
    readable: frozenset[str] | set[str],
) -> list[Condition]:
    """Typed conditions, or FilterRejected as `realtime.subscription_check_filters` raises."""
    conds: list[Condition] = []
    for f in raw:
        if f.column not in readable or f.column not in column_types:
            raise _raise_exception(f"invalid column for filter {f.column}")
        typname = column_types[f.column]
        sqltype = sql_types.get(f.column, typname)
        value: Any
        if f.op == "in":
            items = [_unquote(v.strip()) for v in _split_top(f.value[1:-1], ",") if v.strip()]
            if len(items) > MAX_IN_VALUES:
                raise _raise_exception("too many values for `in` filter. Maximum 100")
            value = tuple(_cast(typname, sqltype, v) for v in items)
        elif f.op == "is":
            if f.value not in IS_KEYWORDS:
                raise _raise_exception(
                    "invalid value for is filter: must be null, true, false, or unknown")
            if f.value != "null" and typname != "bool":
                raise _raise_exception(
                    f"is {f.value} filter requires a boolean column, got {sqltype}")
            value = f.value
        elif f.op in ("like", "ilike"):
            if typname not in LIKE_TYPES:
                raise _raise_exception(
                    f"operator {f.op} requires a text-compatible column type, got {sqltype}")
            value = like_regex(f.value, ignore_case=f.op == "ilike")
        elif f.op in ("match", "imatch"):
            if typname not in REGEX_TYPES:
                raise _raise_exception(
                    f"operator {f.op} requires a text-compatible column type, got {sqltype}")
            try:
                value = re.compile(f.value, re.IGNORECASE if f.op == "imatch" else 0)
            except re.error as exc:
                raise _raise_exception(
                    f"invalid regular expression for {f.op} filter: {exc}") from exc
        else:
            value = _cast(typname, sqltype, f.value)
        conds.append(Condition(f.column, f.op, typname, value, f.negate))
    return conds


def like_regex(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """SQL LIKE as a regex: `%` any run, `_` one character, backslash escapes the next."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
        i += 1
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return re.compile(r"\A" + "".join(out) + r"\Z", flags)


def parse_filter(
    text: str | None,
    column_types: Mapping[str, str],
    sql_types: Mapping[str, str] | None = None,
) -> list[Condition]:
    """Parse and validate in one step (every column readable): for tests and tools."""
    return validate(parse_filters(text), column_types, sql_types or {}, set(column_types))


def matches_all(conds: list[Condition], row: Mapping[str, Any] | None) -> bool:
    if not conds:
        return True
    if row is None:
        return False
    return all(c.matches(row) for c in conds)
