"""`postgres_changes`: subscriptions per channel and dispatch of wal2json changes.

Payloads are built exactly as Supabase's server builds them (`realtime.apply_rls`, see
docs/realtime.md): `{"ids": [...], "data": {schema, table, type, commit_timestamp, columns,
errors, record?, old_record?}}`, one message per channel and `select` list naming every
matching binding id.

Delivery is authorised per subscriber role, in `apply_rls`'s order:
* INSERT/UPDATE on a table without a primary key: `errors: ["Error 400: Bad Request, no
  primary key"]` with empty `columns`/`record` (`old_record` for UPDATE) and no timestamp;
* INSERT/UPDATE when the role may not SELECT every primary key column: the same shape with
  `errors: ["Error 401: Unauthorized"]` (filters are not applied to either error);
* otherwise filters, then RLS: roles that bypass RLS (service_role, superusers) see every
  change; others get INSERT/UPDATE only if a `SELECT ... WHERE pk = ...` as their role with
  their JWT claims finds the row. DELETEs are sent without an RLS check and, on tables with
  RLS, with `old_record` cut down to the primary key. `columns`, `record` and `old_record`
  only hold columns the role may SELECT (and, with a `select` list, those plus the key).

Changes are processed strictly in commit order by one consumer task; nothing is buffered
for absent subscribers (at-most-once). While the database-events rate counter is over the
tenant limit, changes are skipped, as hosted's replication poller does.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import asyncpg
from loguru import logger

from devstack.realtime.channel import Channel
from devstack.realtime.database import Database, TableInfo
from devstack.realtime.filters import (
    Condition,
    FilterError,
    FilterRejected,
    RawFilter,
    matches_all,
    parse_filters,
    validate,
)
from devstack.realtime.limits import RateCounter
from devstack.realtime.values import commit_timestamp, to_json_value

ACTIONS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE"}
EVENTS = {"*", "INSERT", "UPDATE", "DELETE"}
NO_PRIMARY_KEY = "Error 400: Bad Request, no primary key"
UNAUTHORIZED = "Error 401: Unauthorized"
Select = tuple[str, ...] | None


@dataclass(eq=False)
class Binding:
    channel: Channel
    id: int
    event: str
    schema: str
    table: str
    conditions: list[Condition]
    select: Select = None


class SubscriptionError(Exception):
    """Reported to the channel as a `system` error for extension postgres_changes."""


def _to_log(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return str(value)


def _describe(event: str, schema: str, table: str, filters: list[RawFilter],
              select: Select) -> str:
    """`params_to_log/1` of supabase/realtime's Subscriptions."""
    return (
        f"event: {event}, schema: {schema}, table: {table}, "
        f"filters: [{', '.join(f.to_log() for f in filters)}], select: {_to_log(select)}"
    )


def _parse_select(entry: dict[str, Any], schema: str, table: str) -> Select:
    value = entry.get("select")
    if isinstance(value, list):
        cols = tuple(c for c in value if isinstance(c, str))
        if not cols:
            return None
        if schema == "*" or table == "*":
            raise SubscriptionError(
                "Column selection is not supported for wildcard subscriptions. Provide an "
                "explicit schema and table name."
            )
        return cols
    if isinstance(value, str):
        raise SubscriptionError(
            'Error parsing `select` params: expected a list of column name strings, e.g. '
            'select: ["col1", "col2"]'
        )
    return None


class ChangeDispatcher:
    """Registry of postgres_changes bindings and the ordered change consumer."""

    def __init__(self, db: Database, rate: RateCounter | None = None) -> None:
        self.db = db
        self.rate = rate
        self.by_table: dict[tuple[str, str], list[Binding]] = defaultdict(list)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.delivered = 0
        self._visible_xid: int | None = None  # last transaction known visible to snapshots

    # -- subscriptions ---------------------------------------------------------------------
    async def subscribe(self, ch: Channel, entries: list[dict[str, Any]]) -> None:
        """Validate the channel's bindings against the publication and register them."""
        published = await self.db.publication_tables(refresh=True)
        role = str(ch.claims.get("role", ""))
        new: list[Binding] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise SubscriptionError("Error parsing `postgres_changes` params")
            schema_v, table_v = entry.get("schema"), entry.get("table")
            if schema_v is None and table_v is None:
                raise SubscriptionError(
                    "No subscription params provided. Please provide at least a `schema` or "
                    "`table` to subscribe to: " + json.dumps(entry)
                )
            schema = str(schema_v or "public")
            table_pat = str(table_v) if table_v is not None else "*"
            event = str(entry.get("event", "*")).upper()
            if event not in EVENTS:
                event = "*"
            try:
                raw = parse_filters(entry.get("filter"))
            except FilterError as exc:
                raise SubscriptionError(f"Error parsing `filter` params: {exc}") from exc
            select = _parse_select(entry, schema, table_pat)
            described = _describe(event, schema, table_pat, raw, select)
            targets = [
                (s, t) for (s, t) in sorted(published)
                if fnmatch.fnmatchcase(s, schema) and fnmatch.fnmatchcase(t, table_pat)
            ]
            if not targets:
                raise SubscriptionError(
                    "Unable to subscribe to changes with given parameters. Please check "
                    f"Realtime is enabled for the given connect parameters: [{described}]"
                )
            for s, t in targets:
                self.db.forget_table(s, t)  # a join always sees the current definition
                info = await self.db.table(s, t)
                if info is None:
                    continue
                readable = await self.db.readable_columns(info, role)
                try:
                    conds = validate(raw, info.column_types, info.column_sql_types, readable)
                    for col in select or ():
                        if col not in readable:
                            raise FilterRejected(
                                f"ERROR P0001 (raise_exception) invalid column for select {col}"
                            )
                except FilterRejected as exc:
                    raise SubscriptionError(
                        "Unable to subscribe to changes with given parameters. An exception "
                        "happened so please check your connect parameters: "
                        f"[{described}]. Exception: {exc}"
                    ) from exc
                new.append(Binding(ch, int(entry["id"]), event, s, t, conds, select))
        if ch.closed:
            return
        self.unsubscribe(ch)
        for b in new:
            self.by_table[(b.schema, b.table)].append(b)
        logger.debug("{} postgres_changes bindings for {}", len(new), ch.topic)

    def unsubscribe(self, ch: Channel) -> None:
        for key in list(self.by_table):
            kept = [b for b in self.by_table[key] if b.channel is not ch]
            if kept:
                self.by_table[key] = kept
            else:
                del self.by_table[key]

    # -- dispatch --------------------------------------------------------------------------
    def on_change(self, change: dict[str, Any]) -> None:
        """Called on the loop by the replication thread (call_soon_threadsafe)."""
        if (change.get("schema"), change.get("table")) in self.by_table:
            self.queue.put_nowait(change)

    async def run(self) -> None:
        while True:
            change = await self.queue.get()
            for attempt in (1, 2):
                try:
                    await self.dispatch(change)
                    break
                except asyncio.CancelledError:
                    raise
                except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
                    # A pooled connection died with a database restart: retry once on a new one.
                    if attempt == 2:
                        logger.warning("dropping a change after a database error: {}", exc)
                    else:
                        await asyncio.sleep(0.1)
                except Exception:
                    logger.exception("dropping a change that could not be dispatched")
                    break

    async def dispatch(self, change: dict[str, Any]) -> None:
        schema, table = str(change["schema"]), str(change["table"])
        if not self.by_table.get((schema, table)):
            return
        if self.rate is not None and self.rate.triggered:
            logger.debug("change on {}.{} skipped: postgres changes rate limit", schema, table)
            return
        if (schema, table) not in await self.db.publication_tables():
            return
        info = await self.db.table(schema, table)
        cols = change.get("columns") or []
        if info is not None and any(c["name"] not in info.column_types for c in cols):
            self.db.forget_table(schema, table)  # DDL happened since we cached it
            info = await self.db.table(schema, table)
        if info is None:
            return
        kind = ACTIONS[change["action"]]
        types = info.column_types
        record = {
            c["name"]: to_json_value(types.get(c["name"], ""), c.get("value")) for c in cols
        }
        old = {
            c["name"]: to_json_value(types.get(c["name"], ""), c.get("value"))
            for c in change.get("identity") or []
        }
        if kind == "UPDATE" and info.replica_identity == "f":
            # Unchanged TOASTed values are absent from the new tuple; FULL has them.
            for name, value in old.items():
                record.setdefault(name, value)
        row = old if kind == "DELETE" else record

        bindings = [
            b for b in self.by_table.get((schema, table), [])
            if not b.channel.closed and b.event in ("*", kind)
        ]
        if not bindings:
            return
        readable: dict[str, frozenset[str]] = {}
        for b in bindings:
            role = str(b.channel.claims.get("role", ""))
            if role not in readable:
                readable[role] = await self.db.readable_columns(info, role)

        errors: dict[tuple[Channel, Select, str], list[int]] = {}
        matched: dict[tuple[Channel, Select], list[int]] = {}
        for b in bindings:
            cols_ok = readable[str(b.channel.claims.get("role", ""))]
            error = None
            if kind != "DELETE" and not info.pk:
                error = NO_PRIMARY_KEY
            elif kind != "DELETE" and not all(c in cols_ok for c in info.pk):
                error = UNAUTHORIZED
            if error is not None:
                ids = errors.setdefault((b.channel, b.select, error), [])
            elif matches_all(b.conditions, row):
                ids = matched.setdefault((b.channel, b.select), [])
            else:
                continue
            if b.id not in ids:
                ids.append(b.id)
        if not errors and not matched:
            return

        # The commit is decoded before the transaction is visible to other sessions; a
        # subscriber reacting to the event (or our own RLS check) could otherwise not find
        # the row yet.
        xid = change.get("xid")
        if isinstance(xid, int) and xid != self._visible_xid:
            await self.db.wait_visible(xid)
            self._visible_xid = xid
        for (ch, _select, error), ids in errors.items():
            self._send(ch, ids, self._error_data(info, kind, error))
        if not matched:
            return
        allowed = await self._authorise(info, kind, record, list({ch for ch, _ in matched}))
        cache: dict[tuple[frozenset[str], Select], dict[str, Any]] = {}
        for (ch, select), ids in matched.items():
            if ch not in allowed:
                continue
            cols_ok = readable[str(ch.claims.get("role", ""))]
            key = (cols_ok, select)
            if key not in cache:
                cache[key] = self._data(info, kind, change.get("timestamp"), record, old,
                                        cols_ok, select)
            self._send(ch, ids, cache[key])

    def _send(self, ch: Channel, ids: list[int], data: dict[str, Any]) -> None:
        if ch.closed:
            return
        ch.fanout("postgres_changes", {"ids": ids, "data": data})
        self.delivered += 1
        if self.rate is not None:
            self.rate.add(len(ids))

    @staticmethod
    def _error_data(info: TableInfo, kind: str, error: str) -> dict[str, Any]:
        """What `apply_rls` sends instead of the row: no timestamp, no columns, no values."""
        data: dict[str, Any] = {
            "schema": info.schema, "table": info.name, "type": kind,
            "commit_timestamp": None, "columns": [], "errors": [error], "record": {},
        }
        if kind == "UPDATE":
            data["old_record"] = {}
        return data

    @staticmethod
    def _data(
        info: TableInfo, kind: str, ts: str | None, record: dict[str, Any],
        old: dict[str, Any], readable: frozenset[str], select: Select,
    ) -> dict[str, Any]:
        def shown(name: str) -> bool:
            return name in readable and (select is None or name in select or name in info.pk)

        data: dict[str, Any] = {"schema": info.schema, "table": info.name, "type": kind}
        data["commit_timestamp"] = commit_timestamp(ts)
        data["columns"] = [{"name": n, "type": t} for n, t in info.columns if shown(n)]
        data["errors"] = None
        if kind in ("INSERT", "UPDATE"):
            data["record"] = {k: v for k, v in record.items() if shown(k)}
        if kind in ("UPDATE", "DELETE"):
            data["old_record"] = {
                k: v for k, v in old.items()
                if shown(k) and not (kind == "DELETE" and info.rls_enabled and k not in info.pk)
            }
        return data

    async def _authorise(
        self, info: TableInfo, kind: str, record: dict[str, Any], channels: list[Channel]
    ) -> set[Channel]:
        """Channels whose subscriber may see this change, checking each claim set once."""
        if kind == "DELETE" or not info.rls_enabled or not info.pk:
            return set(channels)
        allowed: set[Channel] = set()
        groups: dict[str, list[Channel]] = defaultdict(list)
        for ch in channels:
            if await self.db.bypasses_rls(str(ch.claims.get("role", ""))):
                allowed.add(ch)
            else:
                groups[json.dumps(ch.claims, sort_keys=True)].append(ch)
        if groups:
            pk_values = [record.get(c) for c in info.pk]
            keys = list(groups)
            results = await asyncio.gather(
                *(self.db.row_visible(info, groups[k][0].claims, pk_values) for k in keys),
                return_exceptions=True,
            )
            for key, ok in zip(keys, results, strict=True):
                if ok is True:
                    allowed.update(groups[key])
                elif isinstance(ok, BaseException):
                    logger.warning("visibility check failed: {}", ok)
        return allowed
