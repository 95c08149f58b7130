"""`postgres_changes` filter strings: parsing and typed evaluation.

Grammar (as Supabase's server accepts it): `column=op.value`, optionally `column=not.op.value`,
several conditions joined by commas meaning AND (commas inside `(...)` or `"..."` do not
split). Operators implemented: eq, neq, lt, lte, gt, gte, in (`in.(a,b,"c,d")`, at most 100
values). Both sides are cast to the column type; a NULL (or absent) column fails every
operator, which is SQL's three-valued logic as the real server applies it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from devstack.realtime.values import CoercionError, coerce

OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}
MAX_IN_VALUES = 100


class FilterError(ValueError):
    """An unparsable filter; the channel gets a `system` error like Supabase's."""


@dataclass(frozen=True)
class Condition:
    column: str
    op: str
    typname: str
    value: Any  # coerced; a tuple for `in`
    negate: bool = False

    def matches(self, row: Mapping[str, Any]) -> bool:
        if self.column not in row:
            return False
        raw = row[self.column]
        if raw is None:
            return False
        try:
            actual = coerce(self.typname, raw)
        except CoercionError:
            return False
        if self.op == "in":
            result = actual in self.value
        else:
            try:
                result = OPS[self.op](actual, self.value)
            except TypeError:
                return False
        return not result if self.negate else result


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, buf, depth, quoted, escaped = [], [], 0, False, False
    for ch in text:
        if escaped:
            buf.append(ch)
            escaped = False
            continue
        if ch == "\\" and quoted:
            buf.append(ch)
            escaped = True
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth -= 1
        if ch == sep and depth == 0 and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        out, i = [], 0
        while i < len(inner):
            if inner[i] == "\\" and i + 1 < len(inner):
                i += 1
            out.append(inner[i])
            i += 1
        return "".join(out)
    return value


def parse_filter(text: str | None, column_types: Mapping[str, str]) -> list[Condition]:
    """Conditions for a filter string, checked against the table's `{column: typname}`."""
    if text is None or not text.strip():
        return []
    conds: list[Condition] = []
    for part in _split_top(text):
        column, eq, rest = part.partition("=")
        column = column.strip()
        if not eq or not column:
            raise FilterError(f"Error parsing `filter` params: {text}")
        negate = False
        if rest.startswith("not."):
            negate, rest = True, rest[4:]
        op, dot, raw = rest.partition(".")
        if not dot or (op not in OPS and op != "in"):
            raise FilterError(f"Error parsing `filter` params: {text}")
        if column not in column_types:
            raise FilterError(f"invalid column for filter {column}")
        typname = column_types[column]
        try:
            if op == "in":
                raw = raw.strip()
                if not (raw.startswith("(") and raw.endswith(")")):
                    raise FilterError(f"Error parsing `filter` params: {text}")
                items = [_unquote(v) for v in _split_top(raw[1:-1]) if v.strip()]
                if len(items) > MAX_IN_VALUES:
                    raise FilterError("too many values for `in` filter")
                value: Any = tuple(coerce(typname, v) for v in items)
            else:
                value = coerce(typname, _unquote(raw))
        except CoercionError as exc:
            raise FilterError(f"invalid filter value for column {column}: {exc}") from exc
        conds.append(Condition(column, op, typname, value, negate))
    return conds


def matches_all(conds: list[Condition], row: Mapping[str, Any] | None) -> bool:
    if not conds:
        return True
    if row is None:
        return False
    return all(c.matches(row) for c in conds)
