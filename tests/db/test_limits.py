"""Issue 13, limits and ledger: one limits table, refusals at insert, a ledger deleting cannot
reset. Findings 1 (delete-to-reset), 3 (a giant problem) and 4 (oversized options, a 200,000
element constraints array, a restore flood) each have a test here that failed on the schema
before. Limits are set small per organisation instead of inserting huge inputs, so the
module stays fast.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from click.testing import Result
from typer.testing import CliRunner

from devstack.settings import DevSettings
from devstack.stack import SCAFFOLDING_SQL
from listener import cli, health, metrics, ops
from listener.db import EngineDB
from listener.migrate import CRON_DATABASE_GUC, MIGRATIONS_DIR
from tests.db.conftest import (
    Org,
    as_user,
    claim,
    expect_sqlstate,
    insert_run,
    new_allocation_run,
    new_org,
    plan_json,
    request_run,
)
from tests.support.databases import drop_database
from tests.support.roles import acting_as

INSERT_RUN = ("insert into allocation_planner_runs (organization_id, allocation_run_id,"
              " n_job_lines, constraints, options) values ($1, $2, 2, $3, $4) returning id::text")


async def limited_org(su: asyncpg.Connection, name: str, **limits: Any) -> Org:
    """A new organisation whose own limits row sets `limits` (the rest: the defaults)."""
    org = await new_org(su, name, runs_per_hour=None)
    if limits:
        await set_limits(su, org.id, **limits)
    return org


async def set_limits(su: asyncpg.Connection, org_id: str, **limits: Any) -> None:
    cols = ", ".join(limits)
    args = ", ".join(f"${i + 2}" for i in range(len(limits)))
    updates = ", ".join(f"{c} = excluded.{c}" for c in limits)
    await su.execute(f"insert into planner_engine.limits (organization_id, {cols}) values ($1,"
                     f" {args}) on conflict (organization_id) do update set {updates}",
                     org_id, *limits.values())


async def refused(pg: asyncpg.Connection, org: Org, ar: str, *, constraints: list[str] | None
                  = None, options: dict[str, Any] | None = None) -> asyncpg.PostgresError:
    """The error of a planner's run request that must be refused."""
    try:
        await as_user(pg, org.planner, INSERT_RUN, org.id, ar, constraints or [],
                      json.dumps(options or {}))
    except asyncpg.PostgresError as exc:
        return exc
    raise AssertionError("the request was accepted")


async def ask(pg: asyncpg.Connection, org: Org, ar: str, options: dict[str, Any] | None = None,
              constraints: list[str] | None = None) -> str:
    rows = await as_user(pg, org.planner, INSERT_RUN, org.id, ar, constraints or [],
                         json.dumps(options or {}))
    return str(rows[0]["id"])


async def ars(su: asyncpg.Connection, org: Org, n: int) -> list[str]:
    return [(await new_allocation_run(su, org.id, n_terms=1))[0] for _ in range(n)]


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    return {r["reason"]: r["refusals"]
            for r in await conn.fetch("select * from planner_engine.refusal_counts()")}


# -- finding 1: deleting does not reset the budget -------------------------------------------
async def test_deleting_allocation_runs_does_not_reset_the_hourly_limit(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    """Refused with PL014, a planner's admin deleted the allocation runs (their runs went with
    them by the cascade) and the next request passed. The ledger keeps counting them."""
    org = await limited_org(su, "Deleting Health", runs_per_hour=3)
    first = await ars(su, org, 4)
    for ar in first[:3]:
        await ask(pg, org, ar)
    exc = await refused(pg, org, first[3])
    assert exc.sqlstate == "PL014" and "3 planner runs in the last hour (limit 3)" in str(exc)
    assert "wait until" in (exc.hint or "")
    await as_user(pg, org.admin, "delete from allocation_runs where id = any($1::uuid[])", first)
    assert await su.fetchval("select count(*) from allocation_planner_runs"
                             " where organization_id = $1", org.id) == 0
    (again,) = await ars(su, org, 1)
    assert (await refused(pg, org, again)).sqlstate == "PL014"
    outcomes = await su.fetch("select outcome, settled_at is not null as settled"
                              " from planner_private.usage_ledger where organization_id = $1",
                              org.id)
    assert [(r["outcome"], r["settled"]) for r in outcomes] == [("DELETED", True)] * 3


async def test_deleting_a_generating_run_charges_its_time_limit(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    """A run deleted while its listener solves keeps its whole reservation: deleting and asking
    again must not be cheaper than waiting."""
    org = await limited_org(su, "Generating Health", solver_seconds_per_hour=100)
    ar1, ar2 = await ars(su, org, 2)
    run = await ask(pg, org, ar1, {"time_limit_seconds": 60})
    assert await claim(su, run) is not None
    await as_user(pg, org.admin, "delete from allocation_runs where id = $1", ar1)
    exc = await refused(pg, org, ar2, options={"time_limit_seconds": 60})
    assert exc.sqlstate == "PL042"
    assert "reserves 60 solver-seconds" in str(exc) and "60 in the last hour (limit 100" in str(exc)
    assert "time_limit_seconds of at most 40" in (exc.hint or "")
    await ask(pg, org, ar2, {"time_limit_seconds": 40})


# -- finding 4: the size of a request ---------------------------------------------------------
async def test_oversized_options_are_refused(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    """An 18 MB options object was accepted (and, with the row's replica identity, written to
    the WAL again at every heartbeat). Now refused above max_options_bytes (default 8 kB)."""
    org = await limited_org(su, "Chatty Health")
    (ar,) = await ars(su, org, 1)
    exc = await refused(pg, org, ar, options={"time_limit_seconds": 1, "junk": "x" * 20_000})
    assert exc.sqlstate == "PL041"
    assert "options are 20037 bytes (limit 8192 bytes)" in str(exc), str(exc)
    await ask(pg, org, ar, {"time_limit_seconds": 1, "stability": "prefer"})


async def test_a_200000_element_constraints_array_is_refused(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    """200,000 valid codes were accepted (and checked code by code). Refused by their number
    before any per-code work; the service role too."""
    org = await limited_org(su, "Listy Health")
    (ar,) = await ars(su, org, 1)
    exc = await refused(pg, org, ar, constraints=["AMC_PGY1"] * 200_000)
    assert exc.sqlstate == "PL041" and "200000 rule-set codes (limit 32)" in str(exc)
    async with expect_sqlstate("PL041"):
        await insert_run(su, org.id, ar, constraints=["NO_NIGHTS"] * 33)
    await ask(pg, org, ar, constraints=["NO_NIGHTS", "NO_NIGHTS"])


async def test_restores_per_hour(pg: asyncpg.Connection, su: asyncpg.Connection) -> None:
    """200 restore_job_lines calls made 201 snapshots. Now restores_per_hour applies (with the
    ledger, so deleting snapshots' allocation run changes nothing), and a refused restore
    writes no snapshot."""
    org = await limited_org(su, "Restoring Health", restores_per_hour=3)
    ar, terms = await new_allocation_run(su, org.id, n_terms=2, teams=org.teams)
    for offset in (0, 1):
        run = await insert_run(su, org.id, ar)
        c = await claim(su, run)
        assert c is not None
        await su.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                         run, c["lease"], org.id, plan_json(org, terms, offset=offset))
    snapshot = await su.fetchval("select id from job_lines_history where allocation_run_id = $1",
                                 ar)
    history = "select count(*) from job_lines_history where allocation_run_id = $1"
    before = await su.fetchval(history, ar)
    for _ in range(3):
        await as_user(pg, org.planner, "select public.restore_job_lines($1)", snapshot)
    try:
        await as_user(pg, org.planner, "select public.restore_job_lines($1)", snapshot)
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "PL045" and "restored 3 plans in the last hour (limit 3)" in str(exc)
        assert "wait until" in (exc.hint or "")
    else:
        raise AssertionError("a fourth restore in an hour was accepted")
    async with acting_as(pg, "service_role") as c, expect_sqlstate("PL045"):
        await c.execute("select public.restore_job_lines($1)", snapshot)
    assert await su.fetchval(history, ar) == before + 3


# -- finding 3: the giant problem -------------------------------------------------------------
@pytest.mark.parametrize(("limit", "value", "expected"), [
    ("max_terms", 2, "has 3 terms (limit 2)"),
    ("max_demand_rows", 14, "has 15 team_demand rows (limit 14)"),
    ("max_teams", 4, "lists 5 teams"),
])
async def test_a_problem_beyond_the_limits_is_refused_at_insert(
    pg: asyncpg.Connection, su: asyncpg.Connection, limit: str, value: int, expected: str
) -> None:
    """A 1-line run on 40,000 teams froze the listener. Teams, terms and demand rows of the
    allocation run are counted when the run is requested (bounded counts) and refused."""
    org = await limited_org(su, f"Giant Health {limit}", **{limit: value})
    exc = await refused(pg, org, org.allocation_run_id)  # 5 teams x 3 terms of demand
    assert exc.sqlstate == "PL040" and expected in str(exc), str(exc)
    await set_limits(su, org.id, **{limit: value + 1})
    await request_run(pg, org)


async def test_a_problem_far_beyond_a_limit_is_counted_only_so_far(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    org = await limited_org(su, "Far Health", max_terms=1)
    ar, _ = await new_allocation_run(su, org.id, n_terms=12)
    exc = await refused(pg, org, ar)
    assert "has more than 10 terms (limit 1)" in str(exc)


# -- the queue, the budgets, the time cap ----------------------------------------------------
async def test_queued_runs_at_once(pg: asyncpg.Connection, su: asyncpg.Connection) -> None:
    org = await limited_org(su, "Queue Health", queued_runs=2)
    a1, a2, a3 = await ars(su, org, 3)
    first = await ask(pg, org, a1)
    await ask(pg, org, a2)
    exc = await refused(pg, org, a3)
    assert exc.sqlstate == "PL043" and "2 planner runs pending or generating (limit 2)" in str(exc)
    await as_user(pg, org.planner, "select public.request_cancel($1)", first)
    await ask(pg, org, a3)


async def test_solver_seconds_are_reserved_then_settled(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    """A run reserves its time_limit_s at insert; when an attempt ends, its time since the
    claim (capped at the limit) is what counts; a run cancelled before a claim costs nothing."""
    org = await limited_org(su, "Budget Health", solver_seconds_per_hour=100)
    a1, a2, a3 = await ars(su, org, 3)
    exc = await refused(pg, org, a1, options={"time_limit_seconds": 120})  # alone: too much
    assert exc.sqlstate == "PL042" and (exc.hint or "").startswith(
        "ask for a time_limit_seconds of at most 100;"), exc.hint
    r1 = await ask(pg, org, a1, {"time_limit_seconds": 60})
    assert (await refused(pg, org, a2, options={"time_limit_seconds": 60})).sqlstate == "PL042"
    await as_user(pg, org.planner, "select public.request_cancel($1)", r1)  # never claimed
    r2 = await ask(pg, org, a2, {"time_limit_seconds": 60})
    c = await claim(su, r2)
    assert c is not None
    # the attempt ran 25 s, then the listener handed it back (a deploy), then 10 s more
    await su.execute("update allocation_planner_runs set claimed_at = now() - interval '25 s'"
                     " where id = $1", r2)
    await su.execute("select planner_engine.finish_run($1, $2, 'PENDING')", r2, c["lease"])
    ledger = ("select used_s, settled_at, outcome from planner_private.usage_ledger"
              " where run_id = $1")
    row = await su.fetchrow(ledger, r2)
    assert 25 <= row["used_s"] < 27 and row["settled_at"] is None  # still queued
    c = await claim(su, r2)
    assert c is not None
    await su.execute("update allocation_planner_runs set claimed_at = now() - interval '10 s'"
                     " where id = $1", r2)
    await su.execute("select planner_engine.finish_run($1, $2, 'INFEASIBLE')", r2, c["lease"])
    row = await su.fetchrow(ledger, r2)
    assert 35 <= row["used_s"] < 38 and row["outcome"] == "INFEASIBLE"
    assert await su.fetchval(ledger.replace("used_s, settled_at, outcome", "used_s"), r1) == 0
    # 100 - ~35 used: a 60 s run fits again
    await ask(pg, org, a3, {"time_limit_seconds": 60})


async def test_the_daily_budget_outlives_the_hour(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    org = await limited_org(su, "Daily Health", solver_seconds_per_day=100)
    a1, a2 = await ars(su, org, 2)
    r1 = await ask(pg, org, a1, {"time_limit_seconds": 80})
    await su.execute("update planner_private.usage_ledger set at = now() - interval '5 hours'"
                     " where run_id = $1", r1)
    exc = await refused(pg, org, a2, options={"time_limit_seconds": 30})
    assert exc.sqlstate == "PL042" and "in the last 24 hours (limit 100 per day)" in str(exc)
    await ask(pg, org, a2, {"time_limit_seconds": 20})


async def test_time_limit_is_decided_at_insert(
    pg: asyncpg.Connection, su: asyncpg.Connection
) -> None:
    """The listener's cap (PLANNER_SOLVER_TIME_LIMIT_S) is the row's time_limit_s now: what the
    options ask for, capped at max_time_limit_s; the default when they do not say."""
    org = await limited_org(su, "Timely Health", queued_runs=100)
    cases: list[tuple[dict[str, Any], int]] = [
        ({}, 30), ({"time_limit_seconds": 2.5}, 3), ({"time_limit_seconds": 10**300}, 120),
        ({"time_limit_seconds": "soon"}, 30), ({"time_limit_seconds": -1}, 30)]
    got = []
    for options, _ in cases:
        (ar,) = await ars(su, org, 1)
        run = await ask(pg, org, ar, options)
        got.append(await su.fetchval(
            "select r.time_limit_s from allocation_planner_runs r join planner_private.usage_ledger"
            " l on l.run_id = r.id and l.reserved_s = r.time_limit_s where r.id = $1", run))
    assert got == [expected for _, expected in cases]
    await set_limits(su, org.id, max_time_limit_s=10, default_time_limit_s=20)
    (ar,) = await ars(su, org, 1)
    run = await ask(pg, org, ar)
    assert await su.fetchval("select time_limit_s from allocation_planner_runs where id = $1",
                             run) == 10


# -- tiers, counters ----------------------------------------------------------------------------
async def test_a_tier_and_an_override(pg: asyncpg.Connection, su: asyncpg.Connection) -> None:
    """Value by value: the organisation's own, else its tier's, else the default's."""
    await su.execute("insert into planner_engine.limits (tier, runs_per_hour, max_job_lines)"
                     " values ('tiny', 1, 3)")
    org = await limited_org(su, "Tiny Health", on_tier="tiny")
    a1, a2 = await ars(su, org, 2)
    await ask(pg, org, a1)
    assert (await refused(pg, org, a2)).sqlstate == "PL014"
    await set_limits(su, org.id, runs_per_hour=2)
    async with expect_sqlstate("PL011"):
        await request_run(pg, org, allocation_run_id=a2, n_job_lines=4)
    await request_run(pg, org, allocation_run_id=a2, n_job_lines=3)
    resolved = await su.fetchrow("select * from planner_private.limits_of($1)", org.id)
    assert (resolved["tier"], resolved["runs_per_hour"], resolved["max_job_lines"],
            resolved["max_teams"]) == ("tiny", 2, 3, 1000)


async def test_refusals_are_counted_through_the_rollback(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine: asyncpg.Connection
) -> None:
    """The refused INSERT rolls back; its count does not (a sequence per reason), and the
    engine role reads the counts for /metrics."""
    org = await limited_org(su, "Counted Health", queued_runs=0)
    before = await counts(engine)
    for _ in range(2):
        assert (await refused(pg, org, org.allocation_run_id)).sqlstate == "PL043"
    assert (await refused(pg, org, org.allocation_run_id,
                          constraints=["NOPE"])).sqlstate == "PL010"
    after = await counts(engine)
    assert after["queued_runs"] == before["queued_runs"] + 2
    assert after["unknown_rule_set"] == before["unknown_rule_set"] + 1
    assert {k: v for k, v in after.items() if k not in ("queued_runs", "unknown_rule_set")} \
        == {k: v for k, v in before.items() if k not in ("queued_runs", "unknown_rule_set")}


async def test_metrics_serve_the_database_refusal_counters(
    pg: asyncpg.Connection, su: asyncpg.Connection, engine_url: str
) -> None:
    """/metrics re-reads the counters through the engine's own role at each scrape: a refusal
    that rolled back shows up as planner_refusals_total{reason=...}."""
    org = await limited_org(su, "Scraped Health", max_constraints=0)
    db = await EngineDB.connect(engine_url, max_size=1)

    async def refresh() -> None:
        metrics.REFUSALS.update(await db.refusal_counts())

    async def ready() -> dict[str, Any]:
        return {}

    runner = await health.serve(ready, "127.0.0.1", 0, refresh)
    try:
        port = runner.addresses[0][1]

        async def scrape() -> float:
            async with aiohttp.ClientSession() as session, \
                    session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                text = await resp.text()
            return next(float(line.split()[-1]) for line in text.splitlines()
                        if line.startswith('planner_refusals_total{reason="constraints"}'))

        before = await scrape()
        assert (await refused(pg, org, org.allocation_run_id,
                              constraints=["NO_NIGHTS"])).sqlstate == "PL041"
        assert await scrape() == before + 1
    finally:
        await runner.cleanup()
        await db.close()


# -- operator commands (listener/ops.py) ------------------------------------------------------
def _planner(db_url: str, *args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args), env={"DATABASE_URL": db_url})


async def test_operator_commands_show_and_change_limits_and_the_ledger(
    pg: asyncpg.Connection, su: asyncpg.Connection, db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ops.console, "width", 250)
    org = await limited_org(su, "Operated Health")

    async def planner(*args: str) -> Result:
        return await asyncio.to_thread(_planner, db_url, *args)

    # expected mistakes: one line each, naming the fix
    for args, code, words in [
        (("limits", "set", "--org", org.name, "--on-tier", "gold"), 1, "no tier 'gold'"),
        (("limits", "set", "--org", org.name, "bogus=1"), 2, "known limit"),
        (("limits", "set", "--org", org.name, "queued_runs=-1"), 2, "whole number"),
        (("limits", "set", "--tier", "default", "queued_runs=inherit"), 2, "every value"),
        (("limits", "set", "--tier", "Gold Plan", "queued_runs=1"), 2, "not a tier name"),
        (("limits", "show", "No Such Health"), 1, "no organisation"),
        (("limits", "ledger", "No Such Health"), 1, "no organisation"),
    ]:
        result = await planner(*args)
        assert result.exit_code == code, (args, result.output)
        assert words in result.output and len(result.output.strip().splitlines()) == 1, \
            result.output
        assert "Traceback" not in result.output
    assert (await planner("limits", "set", "--tier", "gold", "queued_runs=4")).exit_code == 0
    result = await planner("limits", "set", "--org", org.id, "--on-tier", "gold",
                           "runs_per_hour=5")
    assert result.exit_code == 0 and "runs_per_hour=5" in result.output, result.output
    resolved = await su.fetchrow("select * from planner_private.limits_of($1)", org.id)
    assert (resolved["tier"], resolved["queued_runs"], resolved["runs_per_hour"]) == \
        ("gold", 4, 5)
    run = await request_run(pg, org)
    shown = (await planner("limits", "show", org.name)).output
    lines = {line.split()[1]: line for line in shown.splitlines() if line.startswith("│")}
    assert "tier gold" in lines["queued_runs"] and "1 pending or generating" in \
        lines["queued_runs"]
    assert "organisation" in lines["runs_per_hour"] and "1 in the last hour" in \
        lines["runs_per_hour"]
    assert "default" in lines["max_teams"] and "1000" in lines["max_teams"]
    assert "tier gold" in shown.splitlines()[0]
    ledger = (await planner("limits", "ledger", org.name)).output
    assert run in ledger and "queued" in ledger
    assert (await planner("limits", "set", "--org", org.name, "runs_per_hour=inherit",
                          "--on-tier", "none")).exit_code == 0
    resolved = await su.fetchrow("select * from planner_private.limits_of($1)", org.id)
    assert (resolved["tier"], resolved["runs_per_hour"]) == ("default", 30)
    tiers = (await planner("limits", "show")).output
    assert "gold" in tiers and "queued_runs" in tiers


async def test_operator_forgives_and_prunes_the_ledger(
    pg: asyncpg.Connection, su: asyncpg.Connection, db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`planner limits forgive` gives an organisation its hourly budget back (the only way to
    shrink what it used, and the operator's, not the tenant's); `planner limits prune` deletes
    only settled entries older than the daily window."""
    monkeypatch.setattr(ops.console, "width", 250)
    org = await limited_org(su, "Forgiven Health", runs_per_hour=2)
    other = await limited_org(su, "Unforgiven Health", runs_per_hour=2)

    async def planner(*args: str) -> Result:
        return await asyncio.to_thread(_planner, db_url, *args)

    a1, a2, a3 = await ars(su, org, 3)
    for ar in (a1, a2):
        run = await ask(pg, org, ar)
        await su.execute("update allocation_planner_runs set status = 'CANCELLED',"
                         " finished_at = now() where id = $1", run)
    assert (await refused(pg, org, a3)).sqlstate == "PL014"
    (b1,) = await ars(su, other, 1)
    queued_elsewhere = await ask(pg, other, b1)
    result = await planner("limits", "forgive", org.name, "--hours", "1")
    assert result.exit_code == 0, result.output
    assert "gave back 2 run(s)" in result.output
    await ask(pg, org, a3)  # accepted again
    # the other organisation's entry is untouched, and a queued entry is never forgiven
    assert await su.fetchval("select count(*) from planner_private.usage_ledger"
                             " where run_id = $1 and settled_at is null", queued_elsewhere) == 1
    bad = await planner("limits", "forgive", "No Such Health")
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
    # prune: only settled entries past the window
    await su.execute("update planner_private.usage_ledger set at = now() - interval '3 days'"
                     " where organization_id = $1", other.id)
    await su.execute("update allocation_planner_runs set status = 'CANCELLED',"
                     " finished_at = now() where id = $1", queued_elsewhere)
    await su.execute("insert into planner_private.usage_ledger (organization_id, kind,"
                     " allocation_run_id, at, settled_at) values ($1, 'restore', $2,"
                     " now() - interval '1 day', now())", other.id, b1)
    result = await planner("limits", "prune")
    assert result.exit_code == 0 and "deleted" in result.output, result.output
    left = await su.fetch("select at > now() - interval '2 days' as recent"
                          " from planner_private.usage_ledger where organization_id = $1",
                          other.id)
    assert [r["recent"] for r in left] == [True]
    too_short = await planner("limits", "prune", "--days", "1")
    assert too_short.exit_code == 2 and "Traceback" not in too_short.output


def test_the_commands_know_every_limit() -> None:
    """LIMIT_KEYS (what `planner limits set` accepts) are exactly the limit columns."""
    text = (Path(__file__).parents[2] / "migrations/schema/10_tables.sql").read_text()
    table = text[text.index("create table planner_engine.limits ("):]
    table = table[:table.index("\n);")]
    columns = [m.group(1) for m in re.finditer(r"^  (\w+) integer check", table, re.MULTILINE)]
    assert tuple(columns) == ops.LIMIT_KEYS


async def test_the_migration_moves_the_old_limits_and_starts_the_ledger(
    dev_settings: DevSettings,
) -> None:
    """migrations/20261203000100 on a database with data: settings.max_job_lines and each
    organizations.max_runs_per_hour land in the limits table, the runs get their time cap, and
    the queued and recent runs their ledger entries (a queued one settles later as usual)."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dev_settings.dsn())
    try:
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(dev_settings.dsn(name))
    try:
        await conn.execute(SCAFFOLDING_SQL.read_text())
        await conn.execute("select set_config($1, $2, false)", CRON_DATABASE_GUC,
                           dev_settings.database)
        this = MIGRATIONS_DIR / "20261203000100_limits_and_ledger.sql"
        before = [p for p in sorted(MIGRATIONS_DIR.glob("*.sql")) if p.name < this.name]
        for path in before:
            async with conn.transaction():
                await conn.execute(path.read_text())
        org = await conn.fetchval("insert into organizations (name, max_runs_per_hour)"
                                  " values ('Old', 7) returning id")
        ar1, ar2 = [await conn.fetchval("insert into allocation_runs (organization_id, name)"
                                        " values ($1, $2) returning id", org, n)
                    for n in ("one", "two")]
        await conn.execute("update planner_engine.settings set max_job_lines = 321")
        queued = await conn.fetchval(
            "insert into allocation_planner_runs (organization_id, allocation_run_id,"
            " n_job_lines, options) values ($1, $2, 2, '{\"time_limit_seconds\": 500}')"
            " returning id", org, ar1)
        done = await conn.fetchval(
            "insert into allocation_planner_runs (organization_id, allocation_run_id,"
            " n_job_lines, status, claimed_at, finished_at, options) values ($1, $2, 2,"
            " 'COMPLETED', now() - interval '12 s', now(), '{\"time_limit_seconds\": 4.2}')"
            " returning id", org, ar2)
        async with conn.transaction():
            await conn.execute(this.read_text())
        limits = await conn.fetch("select tier, organization_id, runs_per_hour, max_job_lines"
                                  " from planner_engine.limits order by tier")
        assert [tuple(r) for r in limits] == [("default", None, 30, 321), (None, org, 7, None)]
        caps = dict(await conn.fetch("select id, time_limit_s from allocation_planner_runs"))
        assert caps == {queued: 120, done: 5}
        ledger = {r["run_id"]: r for r in await conn.fetch(
            "select * from planner_private.usage_ledger")}
        assert ledger[queued]["settled_at"] is None and ledger[queued]["reserved_s"] == 120
        assert ledger[done]["outcome"] == "COMPLETED" and ledger[done]["used_s"] == 5
        await conn.execute("update allocation_planner_runs set status = 'CANCELLED',"
                           " finished_at = now() where id = $1", queued)
        assert await conn.fetchval("select outcome from planner_private.usage_ledger"
                                   " where run_id = $1", queued) == "CANCELLED"
    finally:
        await conn.close()
        await drop_database(dev_settings, name)
