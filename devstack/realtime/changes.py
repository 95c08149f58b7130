"""`postgres_changes`: subscriptions per channel and dispatch of wal2json changes.

Payloads are built exactly as Supabase's server builds them (see docs/realtime.md):
`{"ids": [...], "data": {schema, table, type, commit_timestamp, columns, errors, record?,
old_record?}}` with one message per channel listing every matching binding id.

Delivery is authorised per subscriber: roles that bypass RLS (service_role, superusers) see
every change; others get INSERT/UPDATE only if a `SELECT ... WHERE pk = ...` as their role
with their JWT claims finds the row. DELETEs are sent without a check (the row is gone) and,
on tables with RLS, with `old_record` cut down to the primary key — both as Supabase does.

Changes are processed strictly in commit order by one consumer task; nothing is buffered
for absent subscribers (at-most-once).
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
from devstack.realtime.filters import Condition, FilterError, matches_all, parse_filter
from devstack.realtime.values import commit_timestamp, to_json_value

ACTIONS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE"}
EVENTS = {"*", "INSERT", "UPDATE", "DELETE"}


@dataclass(eq=False)
class Binding:
    channel: Channel
    id: int
    event: str
    schema: str
    table: str
    conditions: list[Condition]


class SubscriptionError(Exception):
    """Reported to the channel as a `system` error for extension postgres_changes."""


def _describe(entry: dict[str, Any]) -> str:
    filt = entry.get("filter")
    filters = f"[{filt}]" if filt else "[]"
    return (
        f"[event: {entry.get('event', '*')}, schema: {entry.get('schema')}, "
        f"table: {entry.get('table', '*')}, filters: {filters}, select: nil]"
    )


class ChangeDispatcher:
    """Registry of postgres_changes bindings and the ordered change consumer."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.by_table: dict[tuple[str, str], list[Binding]] = defaultdict(list)
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.delivered = 0
        self._visible_xid: int | None = None  # last transaction known visible to snapshots

    # -- subscriptions ---------------------------------------------------------------------
    async def subscribe(self, ch: Channel, entries: list[dict[str, Any]]) -> None:
        """Validate the channel's bindings against the publication and register them."""
        published = await self.db.publication_tables(refresh=True)
        new: list[Binding] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise SubscriptionError("Error parsing `postgres_changes` params")
            schema = entry.get("schema")
            table = entry.get("table")
            if schema is None and table is None:
                raise SubscriptionError(
                    "Unable to subscribe to changes with given parameters. "
                    "An exception happened so please check your connect parameters: "
                    + _describe(entry)
                )
            schema = str(schema or "public")
            table_pat = str(table) if table is not None else "*"
            event = str(entry.get("event", "*")).upper()
            if event not in EVENTS:
                event = "*"
            targets = [
                (s, t) for (s, t) in sorted(published)
                if fnmatch.fnmatchcase(s, schema) and fnmatch.fnmatchcase(t, table_pat)
            ]
            if not targets:
                raise SubscriptionError(
                    "Unable to subscribe to changes with given parameters. Please check "
                    "Realtime is enabled for the given connect parameters: " + _describe(entry)
                )
            for s, t in targets:
                self.db.forget_table(s, t)  # a join always sees the current definition
                info = await self.db.table(s, t)
                if info is None:
                    continue
                try:
                    conds = parse_filter(entry.get("filter"), info.column_types)
                except FilterError as exc:
                    raise SubscriptionError(
                        f"Error parsing `filter` params: {exc}"
                    ) from exc
                new.append(Binding(ch, int(entry["id"]), event, s, t, conds))
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

        per_channel: dict[Channel, list[int]] = {}
        for b in self.by_table.get((schema, table), []):
            if b.channel.closed or b.event not in ("*", kind):
                continue
            if not matches_all(b.conditions, row):
                continue
            ids = per_channel.setdefault(b.channel, [])
            if b.id not in ids:
                ids.append(b.id)
        if not per_channel:
            return

        # The commit is decoded before the transaction is visible to other sessions; a
        # subscriber reacting to the event (or our own RLS check) could otherwise not find
        # the row yet.
        xid = change.get("xid")
        if isinstance(xid, int) and xid != self._visible_xid:
            await self.db.wait_visible(xid)
            self._visible_xid = xid
        data = self._data(info, kind, change.get("timestamp"), record, old)
        allowed = await self._authorise(info, kind, record, list(per_channel))
        for ch, ids in per_channel.items():
            if ch in allowed and not ch.closed:
                ch.fanout("postgres_changes", {"ids": ids, "data": data})
                self.delivered += 1

    @staticmethod
    def _data(
        info: TableInfo, kind: str, ts: str | None, record: dict[str, Any], old: dict[str, Any]
    ) -> dict[str, Any]:
        data: dict[str, Any] = {"schema": info.schema, "table": info.name, "type": kind}
        if not info.pk and kind != "DELETE":
            # What Supabase sends for tables without a primary key.
            data.update(
                commit_timestamp=None, columns=[], errors=["Error 400: Bad Request, no primary key"]
            )
            data["record"] = {}
            if kind == "UPDATE":
                data["old_record"] = {}
            return data
        data["commit_timestamp"] = commit_timestamp(ts)
        data["columns"] = [{"name": n, "type": t} for n, t in info.columns]
        data["errors"] = None
        if kind in ("INSERT", "UPDATE"):
            data["record"] = record
        if kind in ("UPDATE", "DELETE"):
            if kind == "DELETE" and info.rls_enabled:
                old = {k: v for k, v in old.items() if k in info.pk}
            data["old_record"] = old
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
