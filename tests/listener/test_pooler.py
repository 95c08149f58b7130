"""The listener through a transaction-mode pooler: Debian's PgBouncer with
`pool_mode = transaction`, standing in for a hosted project's pooler on port 6543.

Without PLANNER_DATABASE_POOLER=transaction (or port 6543) asyncpg names its prepared
statements, and behind such a pooler two clients end up on one server connection with the
same statement names; with it, the listener solves a run through the pooler end to end.
"""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import pytest

from devstack.seed import SeededOrganization
from devstack.settings import DevSettings
from listener.db import EngineDB
from listener.selfcheck import expected_version
from tests.listener.conftest import ListenerFactory
from tests.support.harness import TERMINAL, insert_run, wait_for_status
from tests.support.pgbouncer import PgBouncer


@pytest.fixture(scope="module")
def bouncer(dev_settings: DevSettings, db_name: str) -> Iterator[PgBouncer]:
    with PgBouncer(dev_settings, db_name, pool_mode="transaction", pool_size=2) as pb:
        yield pb


#: the instance seed of this module's organisation (tests/listener/conftest.py `org`)
ORG_SEED = 11


async def moved_to_another_server(bouncer: PgBouncer, cache: int) -> int:
    """`a` runs a statement twice; between the two, `b` holds the server connection `a` used
    (an open transaction), so the pooler sends `a`'s second run to another one."""
    a = await asyncpg.connect(bouncer.engine_dsn(), statement_cache_size=cache)
    b = await asyncpg.connect(bouncer.engine_dsn(), statement_cache_size=cache)
    try:
        assert await a.fetchval("select 1 + $1::int", 1) == 2
        async with b.transaction():
            await b.execute("select 1")  # b now holds the only server connection so far
            return int(await a.fetchval("select 1 + $1::int", 1))
    finally:
        await a.close()
        await b.close()


async def test_named_prepared_statements_break_behind_it(bouncer: PgBouncer):
    """Why the setting exists: with asyncpg's statement cache on, a statement prepared on one
    server connection is missing on the next."""
    with pytest.raises(asyncpg.PostgresError, match="prepared statement"):
        await moved_to_another_server(bouncer, cache=100)


async def test_statements_work_behind_it_with_the_cache_off(bouncer: PgBouncer):
    assert await moved_to_another_server(bouncer, cache=0) == 2
    # The engine's own pool, as the listener opens it behind a transaction pooler.
    db = await EngineDB.connect(bouncer.engine_dsn(), transaction_pooler=True)
    try:
        for _ in range(3):
            rows = await db.self_check(expected_version())
            assert all(r.ok for r in rows), rows
            assert isinstance(await db.pending_runs(), list)
    finally:
        await db.close()


async def test_a_listener_solves_a_run_through_the_pooler(
    bouncer: PgBouncer, listeners: ListenerFactory, db: asyncpg.Connection,
    org: SeededOrganization,
):
    listener = listeners("PB", PLANNER_DATABASE_URL=bouncer.engine_dsn(),
                         PLANNER_DATABASE_POOLER="transaction")
    await listener.wait_ready()
    record = await listener.wait_record("started")
    assert "through a transaction pooler" in record["message"]
    run_id = await insert_run(
        db, user_id=org.planner.id, organization_id=org.id,
        allocation_run_id=org.allocation_run_id, n_job_lines=org.suggested_n_job_lines,
        constraints=list(org.suggested_constraints),
        options={"time_limit_seconds": 1, "deterministic": True})
    row = await wait_for_status(db, run_id, TERMINAL, 60)
    assert row["status"] == "COMPLETED", row
    lines = await db.fetchval(
        "select count(*) from job_lines where allocation_run_id = $1", org.allocation_run_id)
    assert lines == org.suggested_n_job_lines
    # Its run logs went through the pooler too.
    logged = await db.fetchval(
        "select count(*) from planner_execution_logs where planner_run_id = $1", run_id)
    assert logged > 0
