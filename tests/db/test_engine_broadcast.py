"""The UI's events, sent by the database (issue 14, "The service-role key").

`planner_engine.broadcast` writes one message on `planner_run:<id>` through `realtime.send`,
fenced on the lease like `write_logs` (the current lease, or the last one during the log
grace); `planner_engine.announce_queued` sends the queued status of PENDING runs (position and
estimated start computed by the database). Here,
at the database: which rows land in `realtime.messages` (what Realtime streams out), as the
listener's own role. tests/realtime/test_db_broadcast.py shows the rows reach the clients.
"""

from __future__ import annotations

import json
import uuid

import asyncpg

from listener.events import Phase, RunStatus, StatusEvent
from tests.db.conftest import World, claim, expect_sqlstate, insert_run, new_allocation_run


async def messages(su: asyncpg.Connection, run: str) -> list[asyncpg.Record]:
    return await su.fetch("select event, payload, private, extension from realtime.messages"
                          " where topic = $1 order by inserted_at, id", f"planner_run:{run}")


async def broadcast(engine: asyncpg.Connection, run: str, lease: str, event: str,
                    payload: dict[str, object]) -> None:
    await engine.execute("select planner_engine.broadcast($1, $2, $3, $4::jsonb)",
                         run, lease, event, json.dumps(payload))


async def test_broadcast_is_fenced_on_the_lease(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    ar, _ = await new_allocation_run(su, world.a.id)
    run = await insert_run(su, world.a.id, ar)
    c = await claim(engine, run)
    assert c is not None
    lease = str(c["lease"])
    digest = await su.fetchval("select lease::text from allocation_planner_runs where id = $1", run)
    # a wrong lease, the digest members read, another run's id in the payload: PL001 / forced
    for bad in (str(uuid.uuid4()), digest):
        async with expect_sqlstate("PL001"):
            await broadcast(engine, run, bad, "status", {"phase": "loading"})
    assert await messages(su, run) == []
    await broadcast(engine, run, lease, "progress", {"solutions": 1, "run_id": str(uuid.uuid4())})
    [m] = await messages(su, run)
    body = json.loads(m["payload"])
    assert (m["event"], m["private"], m["extension"]) == ("progress", True, "broadcast")
    assert body["run_id"] == run and body["solutions"] == 1
    assert uuid.UUID(body["id"])  # realtime.send adds the message id, as on hosted
    # only the UI's events, only JSON objects
    for event, payload in (("evil", "{}"), ("done", "[1]"), ("done", "null"),
                           ("done", json.dumps({"x": "y" * 70000}))):
        async with expect_sqlstate("22023"):
            await engine.execute("select planner_engine.broadcast($1, $2, $3, $4::jsonb)",
                                 run, lease, event, payload)
    # released: the last lease still sends during the log grace (the `done` after the commit)
    await engine.execute("select planner_engine.finish_run($1, $2, 'FAILED', 'x')", run, lease)
    await broadcast(engine, run, lease, "done", {"status": "FAILED"})
    await su.execute("update planner_private.released_leases set released_at = now()"
                     " - (select log_grace from planner_engine.settings) - interval '1 second'"
                     " where run_id = $1", run)
    async with expect_sqlstate("PL001"):
        await broadcast(engine, run, lease, "done", {"status": "FAILED"})
    assert [r["event"] for r in await messages(su, run)] == ["progress", "done"]


async def test_announce_queued_only_for_pending_runs(
    su: asyncpg.Connection, engine: asyncpg.Connection, world: World
) -> None:
    ar, _ = await new_allocation_run(su, world.a.id)
    ar2, _ = await new_allocation_run(su, world.b.id)
    pending = await insert_run(su, world.a.id, ar)
    held = await insert_run(su, world.b.id, ar2)
    assert await claim(engine, held) is not None
    # a listener beats, so the database can estimate a start time
    await engine.execute("select planner_engine.listener_heartbeat('announcer', false)")
    n = await engine.fetchval("select planner_engine.announce_queued($1::uuid[])",
                              [pending, held, str(uuid.uuid4())])
    assert n == 1
    assert await messages(su, held) == []
    [m] = await messages(su, pending)
    expected = await engine.fetchrow(
        "select runs_ahead, estimated_start from planner_engine.queue_positions(1000)"
        " where id = $1", pending)
    body = json.loads(m["payload"])
    body.pop("id")  # the message id realtime.send adds
    # exactly the listener's StatusEvent (listener/events.py): the UI's contract, in SQL too,
    # with the position and estimated start the database computed (not the caller's)
    event = StatusEvent.model_validate(body)
    assert m["event"] == "status" and set(body) == set(event.payload())  # no other field
    assert (event.status, event.phase, event.position) == (
        RunStatus.PENDING, Phase.QUEUED, expected["runs_ahead"] + 1)
    assert event.estimated_start is not None and expected["estimated_start"] is not None
    assert abs((event.estimated_start - expected["estimated_start"]).total_seconds()) < 60
    async with expect_sqlstate("22023"):
        await engine.fetchval("select planner_engine.announce_queued($1::uuid[])",
                              [str(uuid.uuid4())] * 1001)


async def test_only_the_engine_and_service_role_may_broadcast(
    pg: asyncpg.Connection, su: asyncpg.Connection, world: World
) -> None:
    from tests.support.roles import acting_as

    ar, _ = await new_allocation_run(su, world.a.id)
    run = await insert_run(su, world.a.id, ar)
    for role, sub in (("anon", None), ("authenticated", world.a.admin)):
        for sql in ("select planner_engine.broadcast($1, gen_random_uuid(), 'done', '{}')",
                    "select planner_engine.announce_queued(array[$1::uuid])"):
            async with expect_sqlstate("42501"), acting_as(pg, role, sub=sub) as c:
                await c.execute(sql, run)
    # users cannot write on a run's topic with realtime.send either (no INSERT policy)
    async with acting_as(pg, "authenticated", sub=world.a.admin) as c:
        await c.execute("select realtime.send('{}', 'done', $1, true)", f"planner_run:{run}")
    assert await messages(su, run) == []


async def test_the_engine_cannot_send_on_its_own(engine: asyncpg.Connection, world: World) -> None:
    """Its login reaches realtime.send only through the two functions above: no USAGE on
    schema realtime, so neither realtime.send nor realtime.messages (any topic)."""
    for sql in ("select realtime.send('{}', 'done', 'planner_run:' || gen_random_uuid(), true)",
                "insert into realtime.messages (topic, extension, payload, event, private)"
                " values ('planner-engine-runs', 'broadcast', '{}', 'x', true)"):
        async with expect_sqlstate("42501"):
            await engine.execute(sql)



async def test_stored_messages_are_read_by_their_runs_members_only(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine: asyncpg.Connection, world: World,
) -> None:
    """realtime.messages now keeps the events (hosted keeps them for days): a member who can
    run SQL and sets `realtime.topic` to a run of their own must still read only that run's
    messages, not every organisation's (the read policy compares the row's topic too)."""
    from tests.support.roles import acting_as

    ar_a, _ = await new_allocation_run(su, world.a.id)
    ar_b, _ = await new_allocation_run(su, world.b.id)
    run_a = await insert_run(su, world.a.id, ar_a)
    run_b = await insert_run(su, world.b.id, ar_b)
    c = await claim(engine, run_a)
    assert c is not None
    await broadcast(engine, run_a, str(c["lease"]), "done", {"status": "COMPLETED"})

    async def visible(sub: str, topic_run: str) -> set[str]:
        async with acting_as(pg, "authenticated", sub=sub) as conn:
            await conn.execute("select set_config('realtime.topic', $1, true)",
                               f"planner_run:{topic_run}")
            return {r[0] for r in await conn.fetch("select topic from realtime.messages")}

    assert await visible(world.b.planner, run_b) == set()
    assert await visible(world.a.viewer, run_a) == {f"planner_run:{run_a}"}
