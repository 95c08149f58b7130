"""The server's SQL side: catalog metadata, RLS visibility checks and channel policies.

Uses an asyncpg pool on the superuser DSN. Every authorisation check runs in its own
transaction that switches to the subscriber's role with its JWT claims (`set local role`,
`request.jwt.claims`, `request.jwt.claim.sub/role`, and for channels `realtime.topic`), the
same settings PostgREST and Supabase Realtime use, so RLS policies written for Supabase
(`auth.uid()`, `realtime.topic()`) behave identically here. Probe transactions are always
rolled back.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from loguru import logger

PUBLICATION = "supabase_realtime"
PUBLICATION_TTL_S = 2.0
# Table metadata (columns, PK, RLS flag, replica identity) is re-read after this long, so
# DDL made while the server runs is picked up without a restart.
TABLE_TTL_S = 5.0
# Longest wait for a decoded transaction to become visible to new snapshots.
VISIBILITY_TIMEOUT_S = 5.0
# Whether a (32-bit) xid is still in progress for a snapshot taken now: at or after the
# snapshot's xmax (circular xid order, as TransactionIdFollowsOrEquals) or listed in its xip.
IN_PROGRESS_SQL = """
select ((($1::bigint - pg_snapshot_xmax(s)::text::bigint) % 4294967296 + 4294967296)
        % 4294967296) < 2147483648
    or exists (select 1 from pg_snapshot_xip(s) x where x::text::bigint % 4294967296 = $1)
from pg_current_snapshot() s
"""


@dataclass
class TableInfo:
    """What dispatch needs to know about a table."""

    schema: str
    name: str
    columns: list[tuple[str, str]]  # (name, typname) in attnum order
    column_sql_types: dict[str, str]  # name -> format_type() for casts
    pk: list[str]
    rls_enabled: bool
    replica_identity: str  # d(efault) / f(ull) / i(ndex) / n(othing)
    loaded_at: float = field(default_factory=time.monotonic)

    @property
    def column_types(self) -> dict[str, str]:
        return dict(self.columns)

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class _Rollback(Exception):
    """Raised to roll a probe transaction back."""


class Database:
    """Catalog caches and authorisation checks against the one target database."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None
        self._tables: dict[tuple[str, str], TableInfo] = {}
        self._publication: set[tuple[str, str]] = set()
        self._publication_at = 0.0
        self._bypass: dict[str, bool] = {}
        self._readable: dict[tuple[str, str, str], tuple[float, frozenset[str]]] = {}
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self._dsn, min_size=1, max_size=8, command_timeout=10,
            server_settings={"application_name": "planner_realtime_rls", "timezone": "UTC"},
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "Database.open() first"
        return self._pool

    # -- catalog ---------------------------------------------------------------------------
    async def publication_tables(self, refresh: bool = False) -> set[tuple[str, str]]:
        """Tables in `supabase_realtime`, cached for a couple of seconds."""
        if refresh or time.monotonic() - self._publication_at > PUBLICATION_TTL_S:
            rows = await self.pool.fetch(
                "select schemaname, tablename from pg_publication_tables where pubname = $1",
                PUBLICATION,
            )
            self._publication = {(r[0], r[1]) for r in rows}
            self._publication_at = time.monotonic()
        return self._publication

    def forget_table(self, schema: str, table: str) -> None:
        self._tables.pop((schema, table), None)
        for key in [k for k in self._readable if k[:2] == (schema, table)]:
            del self._readable[key]

    async def readable_columns(self, info: TableInfo, role: str) -> frozenset[str]:
        """Columns `role` may SELECT (`has_column_privilege`, as `realtime.apply_rls` asks),
        cached like the table metadata; none for a role that does not exist."""
        key = (info.schema, info.name, role)
        hit = self._readable.get(key)
        if hit is not None and time.monotonic() - hit[0] < TABLE_TTL_S:
            return hit[1]
        try:
            rows = await self.pool.fetch(
                """
                select a.attname from pg_attribute a
                where a.attrelid = $1::regclass and a.attnum > 0 and not a.attisdropped
                  and has_column_privilege($2, a.attrelid, a.attnum, 'SELECT')
                """,
                info.qualified, role,
            )
        except asyncpg.PostgresError as exc:
            logger.debug("column privileges of role {!r} unknown: {}", role, exc)
            rows = []
        cols = frozenset(r[0] for r in rows)
        self._readable[key] = (time.monotonic(), cols)
        return cols

    async def table(self, schema: str, table: str) -> TableInfo | None:
        """Cached metadata of a table; None if it does not exist."""
        key = (schema, table)
        info = self._tables.get(key)
        if info is not None and time.monotonic() - info.loaded_at < TABLE_TTL_S:
            return info
        row = await self.pool.fetchrow(
            """
            select c.oid, c.relrowsecurity, c.relreplident
            from pg_class c join pg_namespace n on n.oid = c.relnamespace
            where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'p')
            """,
            schema, table,
        )
        if row is None:
            return None
        cols = await self.pool.fetch(
            """
            select a.attname, t.typname, format_type(a.atttypid, null) as sqltype
            from pg_attribute a join pg_type t on t.oid = a.atttypid
            where a.attrelid = $1 and a.attnum > 0 and not a.attisdropped
            order by a.attnum
            """,
            row["oid"],
        )
        pk = await self.pool.fetch(
            """
            select a.attname from pg_index i
            join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
            where i.indrelid = $1 and i.indisprimary
            order by array_position(i.indkey::int2[], a.attnum)
            """,
            row["oid"],
        )
        info = TableInfo(
            schema=schema,
            name=table,
            columns=[(c["attname"], c["typname"]) for c in cols],
            column_sql_types={c["attname"]: c["sqltype"] for c in cols},
            pk=[p["attname"] for p in pk],
            rls_enabled=bool(row["relrowsecurity"]),
            replica_identity=str(row["relreplident"]),
        )
        self._tables[key] = info
        return info

    async def bypasses_rls(self, role: str) -> bool:
        """Whether `role` sees every row (superuser or BYPASSRLS, e.g. service_role)."""
        if role not in self._bypass:
            row = await self.pool.fetchrow(
                "select rolsuper or rolbypassrls from pg_roles where rolname = $1", role
            )
            # Unknown roles cannot see anything; they are denied by the checks below.
            self._bypass[role] = bool(row[0]) if row is not None else False
        return self._bypass[role]

    async def wait_visible(self, xid: int, timeout_s: float = VISIBILITY_TIMEOUT_S) -> bool:
        """Wait until transaction `xid` is no longer in progress for a new snapshot.

        wal2json hands out a transaction's changes as soon as its commit record is flushed,
        which is before the committing backend leaves the proc array: for a short while a new
        snapshot still treats the transaction as running and does not see its rows. Anything
        that reads the row on receipt (our RLS check, a listener claiming a run) must not run
        in that window. Usually the first query answers "visible"; otherwise re-check every
        millisecond (bounded by `timeout_s`).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            running = await self.pool.fetchval(IN_PROGRESS_SQL, xid % 4294967296)
            if not running:
                return True
            if time.monotonic() >= deadline:
                logger.warning("transaction {} still in progress after its commit was decoded", xid)
                return False
            await asyncio.sleep(0.001)

    # -- authorisation ---------------------------------------------------------------------
    @staticmethod
    async def _act_as(
        conn: asyncpg.Connection, claims: dict[str, Any], topic: str | None = None
    ) -> None:
        role = str(claims.get("role", ""))
        await conn.execute(
            "select set_config('request.jwt.claims', $1, true), "
            "set_config('request.jwt.claim.sub', $2, true), "
            "set_config('request.jwt.claim.role', $3, true), "
            "set_config('realtime.topic', $4, true)",
            json.dumps(claims), str(claims.get("sub") or ""), role, topic or "",
        )
        await conn.execute(f"set local role {quote_ident(role)}")

    async def row_visible(
        self, info: TableInfo, claims: dict[str, Any], pk_values: Sequence[Any]
    ) -> bool:
        """Whether the subscriber may SELECT the row with these PK values under RLS."""
        if not info.pk:
            return False
        where = " and ".join(
            f"{quote_ident(c)} = $%d::text::%s" % (i + 1, info.column_sql_types[c])
            for i, c in enumerate(info.pk)
        )
        sql = f"select 1 from {info.qualified} where {where}"
        args = [
            json.dumps(v) if isinstance(v, dict | list) else None if v is None else str(v)
            for v in pk_values
        ]
        async with self.pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            try:
                await self._act_as(conn, claims)
                return await conn.fetchval(sql, *args) is not None
            except asyncpg.PostgresError as exc:
                logger.debug("visibility check denied for role {}: {}", claims.get("role"), exc)
                return False
            finally:
                await tr.rollback()

    async def channel_read(
        self, claims: dict[str, Any], topic: str, extensions: Sequence[str]
    ) -> set[str]:
        """Which extensions (broadcast, presence) of a private topic the subscriber may read.

        Inserts probe rows into realtime.messages as superuser, then SELECTs them as the
        subscriber, all in a transaction that is rolled back.
        """
        async with self.pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            try:
                ids = {}
                for ext in extensions:
                    ids[ext] = await conn.fetchval(
                        "insert into realtime.messages (topic, extension, payload, event, private)"
                        " values ($1, $2, '{}'::jsonb, 'realtime_probe', true) returning id",
                        topic, ext,
                    )
                await self._act_as(conn, claims, topic)
                try:
                    rows = await conn.fetch(
                        "select extension from realtime.messages where id = any($1::uuid[])",
                        list(ids.values()),
                    )
                except asyncpg.PostgresError as exc:
                    logger.debug("read policy check failed on {}: {}", topic, exc)
                    return set()
                return {r["extension"] for r in rows}
            finally:
                await tr.rollback()

    async def channel_write(self, claims: dict[str, Any], topic: str, extension: str) -> bool:
        """Whether the subscriber may INSERT a message (send broadcast / track presence)."""
        async with self.pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            try:
                await self._act_as(conn, claims, topic)
                await conn.execute(
                    "insert into realtime.messages (topic, extension, payload, event, private)"
                    " values ($1, $2, '{}'::jsonb, 'realtime_probe', true)",
                    topic, extension,
                )
                return True
            except asyncpg.PostgresError as exc:
                logger.debug("write policy check failed on {}: {}", topic, exc)
                return False
            finally:
                await tr.rollback()
