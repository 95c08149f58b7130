"""Issue 14, finding 1: change events carry nothing another organisation can use.

Realtime applies no RLS to DELETE changes and matches filters against the old row. With
`REPLICA IDENTITY FULL` the old row was the whole row, so another organisation's planner,
subscribed with filters on size, requester or organisation, learnt those of A's runs whenever A
deleted an allocation run. With the default identity the old row is the primary key alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from devstack.seed import SeededOrganization
from tests.realtime.helpers import PyClient
from tests.support.harness import insert_run
from tests.support.realtime import RealtimeServer

TABLE = "allocation_planner_runs"


async def test_tenant_tables_in_the_publication_keep_the_default_identity(
    db: asyncpg.Connection,
) -> None:
    """Every published table that holds tenant data (an organization_id column) has the
    default replica identity, so no old row beyond its key ever reaches a subscriber."""
    rows = await db.fetch(
        "select c.oid::regclass::text as t, c.relreplident::text as ident"
        " from pg_publication_tables p"
        " join pg_class c on c.oid = format('%I.%I', p.schemaname, p.tablename)::regclass"
        " where p.pubname = 'supabase_realtime' and exists (select 1 from pg_attribute a"
        "   where a.attrelid = c.oid and a.attname = 'organization_id')")
    assert {r["t"] for r in rows} >= {TABLE}
    assert {r["t"]: r["ident"] for r in rows} == {r["t"]: "d" for r in rows}


async def test_filtered_delete_subscriptions_learn_nothing_of_another_organisation(
    db: asyncpg.Connection, orgs: list[SeededOrganization], rt_server: RealtimeServer,
) -> None:
    """B's planner subscribes to DELETEs of runs four times on one channel: unfiltered (the
    sentinel: hosted sends every DELETE's key, unchecked) and filtered on A's size, requester
    and organisation. A deletes an allocation run with a run of 301 lines: the one message
    that arrives lists only the unfiltered binding and carries the run's id alone."""
    a, b = orgs[0], orgs[1]
    allocation_run = await db.fetchval(
        "insert into allocation_runs (organization_id, name) values ($1, 'doomed')"
        " returning id::text", a.id)
    run = await insert_run(db, user_id=a.planner.id, organization_id=a.id,
                           allocation_run_id=allocation_run, n_job_lines=301, constraints=[],
                           options={})
    client = PyClient(rt_server.url, b.planner.access_token)
    got: dict[str, list[dict[str, Any]]] = {}
    arrived = asyncio.Event()

    def record(label: str, payload: dict[str, Any]) -> None:
        got.setdefault(label, []).append(payload)
        arrived.set()
    try:
        ch = client.channel("runs-deleted")
        filters = {"unfiltered": None, "size": "n_job_lines=gt.300",
                   "requester": f"requested_by=eq.{a.planner.id}",
                   "organisation": f"organization_id=eq.{a.id}"}
        for label, flt in filters.items():
            kw = {"filter": flt} if flt else {}
            ch.on_postgres_changes(
                "DELETE", lambda p, label=label: record(label, p),
                table=TABLE, schema="public", **kw)
        assert await client.subscribe(ch, wait_system=True) == "SUBSCRIBED"
        await db.execute("delete from allocation_runs where id = $1", allocation_run)
        await asyncio.wait_for(arrived.wait(), 10)
    finally:
        await client.close()
    # The unfiltered binding's message is the same message every matching binding of this
    # channel would have been named in: it has arrived, so none of them matched.
    assert set(got) == {"unfiltered"}, got.keys()
    (event,) = got["unfiltered"]
    assert event["data"]["old_record"] == {"id": run}
