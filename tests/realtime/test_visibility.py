"""A change is pushed only once its transaction is visible to other sessions.

wal2json emits a transaction's changes as soon as its commit record is flushed, a moment
before the committing backend leaves the proc array. A subscriber that reacts to an INSERT by
reading the row (the listener's `claim_run`, the server's own RLS check) could find nothing in
that window: the listener then dropped the run as "already taken" and, with a long catch-up
interval, never ran it (bench/listener_bench.py hung after a dozen runs). The window is too
short to hit on demand, so the test holds a transaction open on purpose and hands the
dispatcher a change carrying its xid, exactly what it would get from wal2json in the window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from devstack.realtime.changes import Binding, ChangeDispatcher
from devstack.realtime.database import IN_PROGRESS_SQL, Database


class FakeChannel:
    """What dispatch needs of a channel: open, no RLS claims, a fan-out sink."""

    def __init__(self) -> None:
        self.closed = False
        self.claims: dict[str, Any] = {"role": "service_role"}
        self.pushed: list[dict[str, Any]] = []

    def fanout(self, event: str, payload: dict[str, Any]) -> None:
        self.pushed.append(payload)


class VisibilityProbe:
    """The server's pool, counting its "is this transaction still running?" queries: the
    event that shows the dispatcher is waiting for visibility (no time window needed)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.checks = 0
        self._changed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def fetchval(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        if sql == IN_PROGRESS_SQL:
            self.checks += 1
            self._changed.set()
        return await self._pool.fetchval(sql, *args, **kwargs)

    async def asked(self, times: int, wait_s: float = 10.0) -> None:
        async def reached() -> None:
            while self.checks < times:
                self._changed.clear()
                await self._changed.wait()

        try:
            await asyncio.wait_for(reached(), wait_s)
        except TimeoutError:
            raise AssertionError(
                f"the dispatcher checked visibility {self.checks} time(s) in {wait_s}s,"
                f" expected {times}") from None


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "create table if not exists public.rt_visibility (id int primary key, label text);"
            "delete from public.rt_visibility;"
        )
        published = await conn.fetchval(
            "select count(*) from pg_publication_tables"
            " where pubname = 'supabase_realtime' and tablename = 'rt_visibility'"
        )
        if not published:
            await conn.execute("alter publication supabase_realtime add table public.rt_visibility")
    finally:
        await conn.close()
    db = Database(db_url)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


async def test_change_waits_until_its_transaction_is_visible(
    database: Database, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe = VisibilityProbe(database.pool)
    monkeypatch.setattr(database, "_pool", probe)
    dispatcher = ChangeDispatcher(database)
    ch = FakeChannel()
    dispatcher.by_table[("public", "rt_visibility")].append(
        Binding(ch, 1, "INSERT", "public", "rt_visibility", [])  # type: ignore[arg-type]
    )
    writer = await asyncpg.connect(db_url)
    reader = await asyncpg.connect(db_url)
    try:
        tr = writer.transaction()
        await tr.start()
        await writer.execute("insert into public.rt_visibility values (7, 'x')")
        xid = int(await writer.fetchval("select pg_current_xact_id()::text::bigint"))
        change = {
            "action": "I", "xid": xid, "schema": "public", "table": "rt_visibility",
            "timestamp": "2026-11-28 12:00:00.123+00",
            "columns": [{"name": "id", "type": "integer", "value": 7},
                        {"name": "label", "type": "text", "value": "x"}],
            "pk": [{"name": "id", "type": "integer"}],
        }
        task = asyncio.create_task(dispatcher.dispatch(change))
        # The dispatcher asked twice, so it was told "still in progress" and kept waiting.
        await probe.asked(times=2)
        # Still in progress for every other session: nothing may be pushed yet.
        assert await reader.fetchval("select count(*) from public.rt_visibility") == 0
        assert ch.pushed == [], "pushed a change its subscribers cannot read yet"
        assert not task.done()
        await tr.commit()
        await asyncio.wait_for(task, 3)
        assert [p["data"]["record"] for p in ch.pushed] == [{"id": 7, "label": "x"}]
        assert await reader.fetchval("select count(*) from public.rt_visibility") == 1
    finally:
        await writer.close()
        await reader.close()
