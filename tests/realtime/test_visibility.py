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
from devstack.realtime.database import Database


class FakeChannel:
    """What dispatch needs of a channel: open, no RLS claims, a fan-out sink."""

    def __init__(self) -> None:
        self.closed = False
        self.claims: dict[str, Any] = {"role": "service_role"}
        self.pushed: list[dict[str, Any]] = []

    def fanout(self, event: str, payload: dict[str, Any]) -> None:
        self.pushed.append(payload)


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
    database: Database, db_url: str
) -> None:
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
        await asyncio.sleep(0.3)
        # Still in progress for every other session: nothing may be pushed yet.
        assert await reader.fetchval("select count(*) from public.rt_visibility") == 0
        assert ch.pushed == [], "pushed a change its subscribers cannot read yet"
        await tr.commit()
        await asyncio.wait_for(task, 3)
        assert [p["data"]["record"] for p in ch.pushed] == [{"id": 7, "label": "x"}]
        assert await reader.fetchval("select count(*) from public.rt_visibility") == 1
    finally:
        await writer.close()
        await reader.close()
