"""RLS attack matrix: every table and function, attacked from outside organisation A.

Attackers: `anon` (the public API key), B's viewer, B's planner and B's admin (members of
another organisation, signed in), and `planner_engine` (the listener's own login role; a
stolen listener credential). Operations: SELECT / INSERT / UPDATE / DELETE on each table,
aimed at organisation A's rows, and each callable function with A's objects as arguments.

Every cell has an expected outcome, written out in `EXPECTED` below; docs/reliability.md
prints the same table (`python -m tests.db.test_attack_matrix` regenerates it from
`EXPECTED`, so the document cannot drift from what is tested). Outcomes:

* `denied`  - PostgreSQL refuses with 42501 (no privilege, or the row-level-security WITH CHECK)
* `none`    - allowed to ask, but RLS shows/affects 0 of A's rows
* `PLxxx` / `23503` - refused by the named product SQLSTATE / composite foreign key
* `visible` - rows of A are readable *by design* (the rule-set catalogue is global, not tenant
              data; the engine reads no tenant table, only what load_problem returns for a run
              whose lease it holds)
* `ok`      - the call succeeds *by design* and changes nothing of A's (see the row's note)

Each cell runs in a transaction that is rolled back, so cells never influence each other.

Under the behavioural cells lies a matrix **derived from the catalogue**: every table, view,
sequence and function in every schema, and every RLS policy, read from pg_catalog, must have a
decision in `PRIVILEGES` / `POLICIES` (or be one of Supabase's own objects, listed once in
`SUPABASE_OWNED`), and the privileges `anon`, `authenticated` (every member role and every
other organisation's user) and `planner_engine` really hold must equal that decision. A new
object the migrations create fails the suite until someone decides who may use it; every
table and function an API role can reach must also have behavioural cells (or a note in
`REACHABLE_WITHOUT_CELLS` saying why it needs none).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from tests.db.conftest import World, claim, insert_run, new_allocation_run, plan_json

#: The refusal counters (one sequence each, planner_private.refused_<reason>; docs/database.md).
REFUSAL_REASONS = ("not_a_planner", "foreign_allocation_run", "options_bytes", "constraints",
                   "unknown_rule_set", "job_lines", "terms", "demand_rows", "teams",
                   "active_run", "queued_runs", "runs_per_hour", "solver_seconds_hour",
                   "solver_seconds_day", "restores_per_hour")

ACTORS = ["anon", "viewer_B", "planner_B", "admin_B", "engine"]
OPS = ["select", "insert", "update", "delete"]

D, N, V = "denied", "none", "visible"
#: table -> {op: (anon, viewer_B, planner_B, admin_B, engine)}
EXPECTED: dict[str, dict[str, tuple[str, ...]]] = {
    "organizations": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                      "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "organization_members": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                             "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "organization_invitations": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                                 "update": (D, D, D, D, D), "delete": (D, N, N, N, D)},
    "planner_rule_sets": {"select": (D, V, V, V, V), "insert": (D, D, D, D, D),
                          "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "allocation_runs": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                        "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "terms": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
              "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "teams": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
              "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "team_demand": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                    "update": (D, N, N, N, D), "delete": (D, N, N, N, D)},
    "allocation_planner_runs": {"select": (D, N, N, N, D),
                                "insert": (D, "PL012", "PL012", "PL012", D),
                                "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "job_lines": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                  "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "rotations": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                  "update": (D, N, N, N, D), "delete": (D, D, D, D, D)},
    "job_lines_history": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                          "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "planner_execution_logs": {"select": (D, N, N, N, D), "insert": (D, D, D, D, D),
                               "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "planner_engine.settings": {"select": (D, D, D, D, D), "insert": (D, D, D, D, D),
                                "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "planner_private.released_leases": {"select": (D, D, D, D, D), "insert": (D, D, D, D, D),
                                        "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    # Issue 13: the operator's limits and the ledger of what each organisation used. Nobody
    # but the owner: a member must not raise their budget or read another's tier or usage.
    "planner_engine.limits": {"select": (D, D, D, D, D), "insert": (D, D, D, D, D),
                              "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "planner_private.usage_ledger": {"select": (D, D, D, D, D), "insert": (D, D, D, D, D),
                                     "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "planner_private.organization_claims": {
        "select": (D, D, D, D, D), "insert": (D, D, D, D, D),
        "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
    "planner_private.listener_heartbeats": {
        "select": (D, D, D, D, D), "insert": (D, D, D, D, D),
        "update": (D, D, D, D, D), "delete": (D, D, D, D, D)},
}

#: function call (with A's objects) -> (anon, viewer_B, planner_B, admin_B, engine)
EXPECTED_RPC: dict[str, tuple[str, ...]] = {
    "public.request_cancel(A's pending run)": (D, "PL012", "PL012", "PL012", D),
    "public.restore_job_lines(A's snapshot)": (D, "PL012", "PL012", "PL012", D),
    "public.invite_member(A's org)": (D, "PL031", "PL031", "PL031", D),
    "public.accept_invitation(A's invitation)": (D, "PL032", "PL032", "PL032", D),
    "public.planner_run_queue_position(A's pending run)": (D, "PL012", "PL012", "PL012", D),
    "planner_engine.claim_run(A's pending run)": (D, D, D, D, "ok"),
    "planner_engine.heartbeat(A's run, forged lease)": (D, D, D, D, "ok"),
    "planner_engine.load_problem(A's run, forged lease)": (D, D, D, D, "PL001"),
    "planner_engine.commit_plan(A's run, forged lease)": (D, D, D, D, "PL001"),
    "planner_engine.commit_plan(A's run, own lease, B's org)": (D, D, D, D, "PL002"),
    "planner_engine.commit_plan(own B run, A's teams)": (D, D, D, D, "PL002"),
    "planner_engine.finish_run(A's run, forged lease)": (D, D, D, D, "PL001"),
    "planner_engine.finish_run(A's run, the lease column as members read it)":
        (D, D, D, D, "PL001"),
    "planner_engine.write_logs([A's run, B's org, no lease])": (D, D, D, D, "ok"),
    "planner_engine.write_logs([A's run, forged lease, back-dated CRITICAL])":
        (D, D, D, D, "ok"),
    "planner_engine.pending_runs(10)": (D, D, D, D, "ok"),
    "planner_engine.queue_positions(10)": (D, D, D, D, "ok"),
    "planner_engine.listener_heartbeat('evil')": (D, D, D, D, "ok"),
    "planner_engine.sweep_stale_runs()": (D, D, D, D, "ok"),
    "planner_private.sweep_stale_runs('0 seconds', '0 seconds')": (D, D, D, D, D),
    "planner_engine.self_check()": (D, D, D, D, "ok"),
    "planner_engine.broadcast(A's run, forged lease)": (D, D, D, D, "PL001"),
    "planner_engine.broadcast(A's run, the lease column as members read it)":
        (D, D, D, D, "PL001"),
    "planner_engine.announce_queued([A's pending run, A's generating run])": (D, D, D, D, "ok"),
    "planner_engine.refusal_counts()": (D, D, D, D, "ok"),
}
#: Why an `ok` cell is harmless (checked in the test, not only stated).
RPC_NOTES = {
    "planner_engine.claim_run(A's pending run)":
        "the engine serves every organisation: it may claim A's run (that is its job); the run "
        "stays A's and every later write is fenced on the new lease and A's organisation",
    "planner_engine.heartbeat(A's run, forged lease)":
        "answers lease_held = false and writes nothing",
    "planner_engine.write_logs([A's run, B's org, no lease])":
        "the record is skipped: 0 rows written",
    "planner_engine.write_logs([A's run, forged lease, back-dated CRITICAL])":
        "the record is skipped: 0 rows written (and logged_at is the database's now())",
    "planner_engine.pending_runs(10)":
        "ids and creation times of PENDING runs, what the catch-up scan needs to claim them; "
        "no other column, no write",
    "planner_engine.queue_positions(10)":
        "the ids pending_runs already gives, each with the number of runs ahead of it and an "
        "estimated start: no organisation, no size, no write",
    "planner_engine.listener_heartbeat('evil')":
        "records that a listener named so is alive (planner_private.listener_heartbeats, "
        "nobody else reads it): at worst PENDING runs keep waiting for a claim instead of "
        "failing by timeout; it touches no run and no tenant row",
    "planner_engine.sweep_stale_runs()":
        "the engine may run the sweeper; it passes no timeouts, those of "
        "planner_engine.settings apply, so it only touches runs past them",
    "planner_engine.self_check()":
        "reports the login's own grants and the newest migration's version: no tenant data, "
        "writes nothing",
    "planner_engine.announce_queued([A's pending run, A's generating run])":
        "no lease exists before the claim: it sends one fixed message, status PENDING / phase "
        "queued with the position and estimated start the database computes, on the topic of "
        "each run that is PENDING now (the GENERATING run is skipped); a thief can only repeat "
        "a true queue position to the run's watchers. "
        "It writes no table of a tenant (one realtime.messages row per message)",
    "planner_engine.refusal_counts()":
        "refusal counts by reason over all organisations, for /metrics: no organisation, run "
        "or user named, writes nothing",
}


# -- the catalogue layer ---------------------------------------------------------------------
#: The database roles behind the actors: anon; authenticated (viewer_B, planner_B, admin_B and
#: every member of every organisation: what separates them is RLS, tested cell by cell above);
#: the listener's planner_engine. (service_role bypasses RLS by design and holds everything.)
ROLES = ("anon", "authenticated", "planner_engine")
SEL, CRUD = "select", "select,insert,update,delete"
#: object -> privileges of (anon, authenticated, planner_engine), as `privileges_of` spells
#: them: table privileges comma-separated, a column-only grant as `update(col,...)`.
PRIVILEGES: dict[str, tuple[str, str, str]] = {
    "public.organizations": ("", SEL, ""),
    "public.organization_members": ("", "select,delete,update(role)", ""),
    "public.organization_invitations": ("", "select,delete", ""),
    "public.planner_rule_sets": ("", SEL, SEL),
    "public.allocation_runs": ("", CRUD, ""),
    "public.terms": ("", CRUD, ""),
    "public.teams": ("", CRUD, ""),
    "public.team_demand": ("", CRUD, ""),
    "public.allocation_planner_runs": ("", "select,insert", ""),
    "public.job_lines": ("", SEL, ""),
    "public.rotations": ("", "select,update(pinned,team_id)", ""),
    "public.job_lines_history": ("", SEL, ""),
    "public.planner_execution_logs": ("", SEL, ""),
    "public.planner_execution_logs_id_seq": ("", "", ""),
    "planner_engine.settings": ("", "", ""),
    "planner_private.released_leases": ("", "", ""),
    "planner_private.organization_claims": ("", "", ""),
    "planner_private.listener_heartbeats": ("", "", ""),
    "public.request_cancel(uuid)": ("", "execute", ""),
    "public.planner_run_queue_position(uuid)": ("", "execute", ""),
    "planner_engine.listener_heartbeat(text,boolean)": ("", "", "execute"),
    "planner_engine.queue_positions(integer)": ("", "", "execute"),
    "planner_private.queue_positions()": ("", "", ""),
    "planner_private.estimated_start(integer)": ("", "", ""),
    "planner_private.live_listeners()": ("", "", ""),
    "public.restore_job_lines(uuid)": ("", "execute", ""),
    "public.invite_member(uuid,text,text)": ("", "execute", ""),
    "public.accept_invitation(uuid)": ("", "execute", ""),
    "planner_engine.claim_run(text,uuid)": ("", "", "execute"),
    "planner_engine.heartbeat(uuid,uuid)": ("", "", "execute"),
    "planner_engine.load_problem(uuid,uuid)": ("", "", "execute"),
    "planner_engine.commit_plan(uuid,uuid,uuid,jsonb,jsonb)": ("", "", "execute"),
    "planner_engine.finish_run(uuid,uuid,text,text,jsonb)": ("", "", "execute"),
    "planner_engine.write_logs(jsonb)": ("", "", "execute"),
    "planner_engine.pending_runs(integer)": ("", "", "execute"),
    "planner_engine.sweep_stale_runs()": ("", "", "execute"),
    "planner_engine.self_check(text)": ("", "", "execute"),
    "planner_engine.broadcast(uuid,uuid,text,jsonb)": ("", "", "execute"),
    "planner_engine.announce_queued(uuid[])": ("", "", "execute"),
    "planner_engine.refusal_counts()": ("", "", "execute"),
    "planner_private.has_role(uuid,text[])": ("", "execute", ""),
    "planner_private.is_member(uuid)": ("", "execute", ""),
    "planner_private.can_plan(uuid)": ("", "execute", ""),
    "planner_private.invoker_is_privileged()": ("", "execute", ""),
    "planner_private.can_read_run_topic(text)": ("", "execute", ""),
    "planner_private.admit_user_run(allocation_planner_runs)": ("", "execute", ""),
    "planner_private.admit_privileged_run(allocation_planner_runs)": ("", "", ""),
    "planner_private.admission_checks(allocation_planner_runs,text)": ("", "", ""),
    # issue 13: limits, ledger, refusal counters; the owner's (reached from definer functions
    # and triggers only)
    "planner_engine.limits": ("", "", ""),
    "planner_private.usage_ledger": ("", "", ""),
    "planner_private.usage_ledger_id_seq": ("", "", ""),
    **{f"planner_private.refused_{reason}": ("", "", "") for reason in REFUSAL_REASONS},
    "planner_private.limits_of(uuid)": ("", "", ""),
    "planner_private.refuse(text,text,text,text)": ("", "", ""),
    "planner_private.charged_s(planner_private.usage_ledger)": ("", "", ""),
    "planner_private.usage_in(uuid,interval)": ("", "", ""),
    "planner_private.fits_at(uuid,interval,text,boolean,numeric,numeric)": ("", "", ""),
    "planner_private.wait_until(timestamp with time zone)": ("", "", ""),
    "planner_private.shown_count(bigint,integer)": ("", "", ""),
    "planner_private.allocation_planner_runs_charge()": ("", "", ""),
    "planner_private.allocation_planner_runs_settle()": ("", "", ""),
    "planner_private.allocation_planner_runs_settle_deleted()": ("", "", ""),
    "planner_private.admit_restore(uuid,uuid)": ("", "", ""),
    "planner_private.caller_is_privileged()": ("", "", ""),
    "planner_private.caller_can_plan(uuid)": ("", "", ""),
    "planner_private.allocation_planner_runs_before_insert()": ("", "", ""),
    "planner_private.allocation_planner_runs_before_update()": ("", "", ""),
    "planner_private.touch_updated_at()": ("", "", ""),
    "planner_private.check_plan(jsonb,uuid,uuid)": ("", "", ""),
    "planner_private.current_plan(uuid,boolean)": ("", "", ""),
    "planner_private.replace_plan(uuid,uuid,jsonb,uuid,uuid,uuid)": ("", "", ""),
    "planner_private.raise_lease_lost(uuid,text)": ("", "", ""),
    "planner_private.history_belongs_to_its_run()": ("", "", ""),
    "planner_private.log_belongs_to_its_run()": ("", "", ""),
    "planner_private.snapshot_before_delete()": ("", "", ""),
    "planner_private.keep_one_admin()": ("", "", ""),
    "planner_private.caller_email()": ("", "execute", ""),
    # service_role only: `planner history purge` (tests/db/test_history_append_only.py)
    "planner_private.purge_history(uuid)": ("", "", ""),
    "planner_private.lease_digest(uuid)": ("", "", ""),
    "planner_private.lease_digest_text(text)": ("", "", ""),
    "planner_private.allocation_planner_runs_remember_lease()": ("", "", ""),
    "planner_private.sweep_stale_runs(interval,interval)": ("", "", ""),
}
#: Supabase's own objects (the scaffolding stands in for a hosted project): not the
#: migrations' to decide, listed once so that nothing else can hide among them.
SUPABASE_OWNED = frozenset({
    "auth.users", "auth.uid()", "auth.role()", "auth.jwt()",
    "realtime.messages", "realtime.topic()", "realtime.send(jsonb,text,text,boolean)",
    "supabase_migrations.schema_migrations",
})
#: Every RLS policy, on any table (the migrations add some to realtime.messages):
#: (table, policy) -> (command, roles).
POLICIES: dict[tuple[str, str], tuple[str, str]] = {
    ("public.organizations", "members_read"): ("SELECT", "authenticated"),
    ("public.organization_members", "members_read"): ("SELECT", "authenticated"),
    ("public.organization_members", "admins_update"): ("UPDATE", "authenticated"),
    ("public.organization_members", "admins_delete"): ("DELETE", "authenticated"),
    ("public.organization_invitations", "admins_and_invitee_read"): ("SELECT", "authenticated"),
    ("public.organization_invitations", "admins_delete"): ("DELETE", "authenticated"),
    ("public.planner_rule_sets", "everyone_signed_in_reads"):
        ("SELECT", "authenticated,planner_engine"),
    **{(f"public.{t}", name): (cmd, role)
       for t in ("allocation_runs", "terms", "teams", "team_demand")
       for name, cmd, role in (("members_read", "SELECT", "authenticated"),
                               ("planners_insert", "INSERT", "authenticated"),
                               ("planners_update", "UPDATE", "authenticated"))},
    # deleting allocation runs and terms removes rotations of a plan: admins only
    **{(f"public.{t}", "admins_delete"): ("DELETE", "authenticated")
       for t in ("allocation_runs", "terms")},
    **{(f"public.{t}", "planners_delete"): ("DELETE", "authenticated")
       for t in ("teams", "team_demand")},
    ("public.allocation_planner_runs", "members_read"): ("SELECT", "authenticated"),
    ("public.allocation_planner_runs", "planners_insert"): ("INSERT", "authenticated"),
    ("public.job_lines", "members_read"): ("SELECT", "authenticated"),
    ("public.rotations", "members_read"): ("SELECT", "authenticated"),
    ("public.rotations", "planners_update"): ("UPDATE", "authenticated"),
    ("public.job_lines_history", "members_read"): ("SELECT", "authenticated"),
    ("public.planner_execution_logs", "members_read"): ("SELECT", "authenticated"),
    ("realtime.messages", "planner_run_members_read"): ("SELECT", "authenticated"),
    ("realtime.messages", "planner_engine_runs_listener_read"): ("SELECT", "service_role"),
    # the owner of planner_engine.broadcast / announce_queued (the migration runner) writes the
    # UI's messages with realtime.send, on run topics only
    ("realtime.messages", "planner_run_engine_send"): ("INSERT", "postgres"),
}
#: Functions an API role may execute that have no behavioural cell, and why none is needed.
REACHABLE_WITHOUT_CELLS = {
    "planner_private.has_role(uuid,text[])":
        "policy helper: answers whether the caller itself holds a role (auth.uid())",
    "planner_private.is_member(uuid)": "policy helper: the caller's own membership",
    "planner_private.can_plan(uuid)": "policy helper: the caller's own planner/admin role",
    "planner_private.invoker_is_privileged()": "the insert trigger's question about current_user",
    "planner_private.caller_email()":
        "organization_invitations' read policy: the caller's own e-mail address, nobody else's",
    "planner_private.can_read_run_topic(text)":
        "realtime.messages policy: the caller's own membership of the run's organisation",
    "planner_private.admit_user_run(allocation_planner_runs)":
        "the insert trigger's admission for a user: membership first "
        "(tests/db/test_private_helpers.py attacks it directly)",
}

#: Every table, view, sequence and function outside PostgreSQL's own schemas and outside
#: extensions (pg_cron's objects belong to pg_cron), as `schema.name` / regprocedure text.
CATALOGUE_SQL = """
select n.nspname || '.' || c.relname as object, c.relkind::text as kind
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
   and n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')
   and not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass
                    and d.objid = c.oid and d.deptype = 'e')
union all
select case when n.nspname = 'public' then 'public.' else '' end || p.oid::regprocedure::text,
       'function'
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
 where n.nspname not in ('pg_catalog', 'information_schema')
   and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass
                    and d.objid = p.oid and d.deptype = 'e')
"""
TABLE_PRIVILEGES = ("select", "insert", "update", "delete", "truncate", "references", "trigger")


async def privileges_of(conn: asyncpg.Connection, obj: str, kind: str, role: str) -> str:
    """What `role` may do with `obj`, read from the catalogue (has_*_privilege, so grants to
    PUBLIC and through role membership count)."""
    if kind == "function":
        ok = await conn.fetchval("select has_function_privilege($1, $2::regprocedure,"
                                 " 'execute')", role, obj)
        return "execute" if ok else ""
    if kind == "S":
        return ",".join([p for p in ("usage", "select", "update") if await conn.fetchval(
            "select has_sequence_privilege($1, $2::regclass, $3)", role, obj, p)])
    held = [p for p in TABLE_PRIVILEGES if await conn.fetchval(
        "select has_table_privilege($1, $2::regclass, $3)", role, obj, p)]
    for p in ("select", "insert", "update"):
        if p not in held:
            cols = [r[0] for r in await conn.fetch(
                "select a.attname from pg_attribute a where a.attrelid = $2::regclass"
                " and a.attnum > 0 and not a.attisdropped"
                " and has_column_privilege($1, a.attrelid, a.attnum, $3) order by a.attname",
                role, obj, p)]
            if cols:
                held.append(f"{p}({','.join(cols)})")
    return ",".join(held)


async def undecided_objects(conn: asyncpg.Connection) -> list[str]:
    """Objects in the catalogue with no decision that are not Supabase's."""
    objects = {r["object"] for r in await conn.fetch(CATALOGUE_SQL)}
    return sorted(objects - set(PRIVILEGES) - SUPABASE_OWNED)


async def test_a_new_object_without_a_decision_is_caught(su: asyncpg.Connection) -> None:
    """The holes the hand-written matrix could not see: a new public table without RLS and a
    SECURITY DEFINER function in public (created in a transaction that is rolled back)."""
    tx = su.transaction()
    await tx.start()
    try:
        await su.execute("create table public.sneaky (id int)")
        await su.execute("create function public.sneaky_definer() returns int language sql"
                         " security definer as 'select 1'")
        await su.execute("create view planner_private.sneaky_view as select 1 as x")
        assert await undecided_objects(su) == [
            "planner_private.sneaky_view", "public.sneaky", "public.sneaky_definer()"]
    finally:
        await tx.rollback()


async def test_every_object_has_a_privilege_decision(su: asyncpg.Connection) -> None:
    """Derived from the catalogue: each object is decided or Supabase's, and each role holds
    exactly the decided privileges. Fails on a new object without a decision."""
    objects = {r["object"]: r["kind"] for r in await su.fetch(CATALOGUE_SQL)}
    undecided = await undecided_objects(su)
    assert not undecided, f"objects without a privilege decision (add them to PRIVILEGES): " \
                          f"{undecided}"
    gone = sorted((set(PRIVILEGES) | SUPABASE_OWNED) - set(objects))
    assert not gone, f"decisions for objects that no longer exist: {gone}"
    wrong = []
    for obj, decided in PRIVILEGES.items():
        for role, want in zip(ROLES, decided, strict=True):
            got = await privileges_of(su, obj, objects[obj], role)
            if got != want:
                wrong.append(f"{role} on {obj}: decided {want!r}, holds {got!r}")
    assert not wrong, "\n".join(wrong)


async def test_every_policy_has_a_decision(su: asyncpg.Connection) -> None:
    """Every RLS policy in the database (a permissive policy widens access; one added to a
    Supabase table such as realtime.messages too) is in POLICIES, with its command and roles."""
    found = {(f"{r['schemaname']}.{r['tablename']}", r["policyname"]): (r["cmd"], r["roles"])
             for r in await su.fetch(
                 "select schemaname, tablename, policyname, cmd,"
                 " array_to_string(array(select unnest(roles) order by 1), ',') as roles"
                 " from pg_policies")}
    assert found == POLICIES


async def test_what_api_roles_reach_has_behavioural_cells(su: asyncpg.Connection) -> None:
    """A table an API role may touch has a row in EXPECTED; a function it may execute has a
    call in EXPECTED_RPC or a reason in REACHABLE_WITHOUT_CELLS."""
    objects = {r["object"]: r["kind"] for r in await su.fetch(CATALOGUE_SQL)}
    tables = {obj.removeprefix("public.") for obj, kind in objects.items()
              if kind != "function" and kind != "S" and obj not in SUPABASE_OWNED}
    assert tables == set(EXPECTED), tables ^ set(EXPECTED)
    called = {call.split("(")[0] for call in EXPECTED_RPC}
    for obj, decided in PRIVILEGES.items():
        if objects[obj] == "function" and any(decided):
            assert obj.split("(")[0] in called or obj in REACHABLE_WITHOUT_CELLS, obj


@dataclass
class Fixture:
    w: World
    pending_run: str  # A, PENDING
    gen_run: str  # A, GENERATING (lease known only to the superuser)
    gen_lease: str
    gen_lease_column: str  # what a member (or a Realtime subscriber) reads in runs.lease
    snapshot: str  # A's snapshot
    b_gen_run: str  # B, GENERATING, lease known
    b_gen_lease: str
    b_terms: list[str]
    invitation: str  # an open invitation to A (for an address of nobody here)


@pytest.fixture(scope="module")
async def fx(su: asyncpg.Connection, world: World) -> Fixture:
    a, b = world.a, world.b
    for offset in (0, 1):  # two commits: lines, rotations and one snapshot
        run = await insert_run(su, a.id, a.allocation_run_id)
        c = await claim(su, run)
        assert c is not None
        snap = await su.fetchval("select planner_engine.commit_plan($1, $2, $3, $4, '{}')::text",
                                 run, c["lease"], a.id, plan_json(a, a.terms, offset=offset))
        await su.execute("insert into planner_execution_logs (planner_run_id, organization_id,"
                         " level, message) values ($1, $2, 'INFO', 'hello')", run, a.id)
    pending = await insert_run(su, a.id, a.allocation_run_id)
    ar2, _ = await new_allocation_run(su, a.id, teams=a.teams)
    gen = await insert_run(su, a.id, ar2)
    cg = await claim(su, gen)
    assert cg is not None
    b_run = await insert_run(su, b.id, b.allocation_run_id)
    cb = await claim(su, b_run)
    assert cb is not None
    await su.execute("select planner_engine.listener_heartbeat('matrix-fixture')")
    invitation = await su.fetchval(
        "select public.invite_member($1, 'invitee@example.test', 'viewer')::text", a.id)
    column = str(await su.fetchval("select lease from allocation_planner_runs where id = $1", gen))
    return Fixture(world, pending, gen, str(cg["lease"]), column, str(snap), b_run,
                   str(cb["lease"]), b.terms, str(invitation))


def _a_filter(table: str) -> str:
    if table == "organizations":
        return "id = $1"
    if table in ("planner_rule_sets", "planner_engine.settings",
                 "planner_private.released_leases", "planner_engine.limits",
                 "planner_private.listener_heartbeats"):
        return "$1::uuid is not null"
    return "organization_id = $1"


def _insert_sql(table: str, f: Fixture) -> tuple[str, list[Any]]:
    a, b = f.w.a, f.w.b
    ar, t0, tm0 = a.allocation_run_id, a.terms[0], a.teams[0]
    return {
        "organizations": ("insert into organizations (name) values ('x')", []),
        "organization_members": ("insert into organization_members values ($1, $2, 'admin')",
                                 [a.id, b.planner]),
        "organization_invitations": ("insert into organization_invitations (organization_id,"
                                     " email, role) values ($1, 'evil@example.test', 'admin')",
                                     [a.id]),
        "planner_rule_sets": ("insert into planner_rule_sets (code, description)"
                              " values ('EVIL', 'x')", []),
        "allocation_runs": ("insert into allocation_runs (organization_id, name)"
                            " values ($1, 'x')", [a.id]),
        "terms": ("insert into terms (organization_id, allocation_run_id, ordinal, name, weeks)"
                  " values ($1, $2, 99, 'x', 5)", [a.id, ar]),
        "teams": ("insert into teams (organization_id, name, specialty, subspecialty)"
                  " values ($1, 'x', 'x', 'x')", [a.id]),
        "team_demand": ("insert into team_demand (organization_id, allocation_run_id, team_id,"
                        " term_id, max_lines) values ($1, $2, $3, $4, 1)",
                        [a.id, ar, tm0, t0]),
        "allocation_planner_runs": (
            "insert into allocation_planner_runs (organization_id, allocation_run_id,"
            " n_job_lines) values ($1, $2, 1)", [a.id, a.allocation_run_id]),
        "job_lines": ("insert into job_lines (organization_id, allocation_run_id, line_number)"
                      " values ($1, $2, 999)", [a.id, ar]),
        "rotations": ("insert into rotations (organization_id, allocation_run_id, job_line_id,"
                      " term_id, team_id) values ($1, $2, $3, $4, $5)",
                      [a.id, ar, str(uuid.uuid4()), t0, tm0]),
        "job_lines_history": (
            "insert into job_lines_history (organization_id, allocation_run_id, n_lines, plan)"
            " values ($1, $2, 0, '{\"lines\": []}')", [a.id, ar]),
        "planner_execution_logs": (
            "insert into planner_execution_logs (planner_run_id, organization_id, level,"
            " message) values ($1, $2, 'INFO', 'x')", [f.pending_run, a.id]),
        "planner_engine.settings": ("insert into planner_engine.settings default values", []),
        "planner_private.released_leases": (
            "insert into planner_private.released_leases values ($1, gen_random_uuid(), now())",
            [f.pending_run]),
        "planner_engine.limits": (
            "insert into planner_engine.limits (organization_id, runs_per_hour)"
            " values ($1, 1000000) on conflict (organization_id) do update set runs_per_hour"
            " = excluded.runs_per_hour", [b.id]),
        "planner_private.usage_ledger": (
            "insert into planner_private.usage_ledger (organization_id, kind, allocation_run_id,"
            " settled_at) values ($1, 'restore', $2, now())", [a.id, ar]),
        "planner_private.organization_claims": (
            "insert into planner_private.organization_claims values ($1, now())", [b.id]),
        "planner_private.listener_heartbeats": (
            "insert into planner_private.listener_heartbeats (worker_id, beat_at)"
            " values ('evil', now())", []),
    }[table]


_SET = {"organizations": "name = name", "organization_members": "role = role",
        "organization_invitations": "role = role",
        "planner_rule_sets": "description = description", "rotations": "pinned = pinned",
        "allocation_planner_runs": "n_job_lines = n_job_lines",
        "planner_engine.settings": "max_attempts = max_attempts",
        "planner_private.released_leases": "released_at = released_at",
        "planner_engine.limits": "runs_per_hour = runs_per_hour",
        "planner_private.usage_ledger": "used_s = used_s",
        "planner_private.organization_claims": "last_claimed_at = last_claimed_at",
        "planner_private.listener_heartbeats": "beat_at = beat_at"}


async def _as_actor(
    actor: str, f: Fixture, pg: asyncpg.Connection,
    op: Callable[[asyncpg.Connection], Awaitable[str]],
    after: Callable[[asyncpg.Connection], Awaitable[None]] | None = None,
) -> str:
    """Run `op` as the actor inside a transaction that is always rolled back. The engine is
    `set role planner_engine` (the same privileges as its login). `after`, if given, runs in
    the same transaction once `op` succeeded, back as superuser: it sees what `op` changed
    before the rollback throws it away."""
    tx = pg.transaction()
    await tx.start()
    try:
        if actor == "engine":
            await pg.execute("set local role planner_engine")
        else:
            role = "anon" if actor == "anon" else "authenticated"
            b = f.w.b
            sub = {"viewer_B": b.viewer, "planner_B": b.planner, "admin_B": b.admin}.get(actor)
            claims = {"role": role, **({"sub": sub} if sub else {})}
            await pg.execute(
                "select set_config('request.jwt.claims', $1, true),"
                " set_config('request.jwt.claim.sub', $2, true),"
                " set_config('request.jwt.claim.role', $3, true)",
                json.dumps(claims), sub or "", role)
            await pg.execute(f"set local role {role}")
        try:
            got = await op(pg)
        except asyncpg.PostgresError as exc:
            return "denied" if exc.sqlstate == "42501" else str(exc.sqlstate)
        if after is not None:
            await pg.execute("reset role")
            await after(pg)
        return got
    finally:
        await tx.rollback()


def _table_op(table: str, op: str, f: Fixture) -> Callable[[asyncpg.Connection], Awaitable[str]]:
    a_id = f.w.a.id
    filt = _a_filter(table)

    async def run(conn: asyncpg.Connection) -> str:
        if op == "select":
            n = await conn.fetchval(f"select count(*) from {table} where {filt}", a_id)
            return "visible" if n else "none"
        if op == "insert":
            sql, args = _insert_sql(table, f)
            await conn.execute(sql, *args)
            return "ok"
        sql = (f"update {table} set {_SET.get(table, 'organization_id = organization_id')}"
               if op == "update" else f"delete from {table}")
        status = await conn.execute(f"{sql} where {filt}", a_id)
        return "none" if status.endswith(" 0") else f"changed ({status})"

    return run


CELLS = [(t, op, actor) for t in EXPECTED for op in OPS for actor in ACTORS]


@pytest.mark.parametrize(("table", "op", "actor"), CELLS,
                         ids=[f"{t}-{op}-{a}" for t, op, a in CELLS])
async def test_table_cell(pg: asyncpg.Connection, fx: Fixture,
                          table: str, op: str, actor: str) -> None:
    expected = EXPECTED[table][op][ACTORS.index(actor)]
    got = await _as_actor(actor, fx, pg, _table_op(table, op, fx))
    assert got == expected, f"{actor} {op} on {table}: expected {expected}, got {got}"


def _rpc(name: str, f: Fixture) -> Callable[[asyncpg.Connection], Awaitable[str]]:
    a, b = f.w.a, f.w.b
    forged = str(uuid.uuid4())

    async def run(conn: asyncpg.Connection) -> str:
        if name.startswith("public.request_cancel"):
            await conn.execute("select public.request_cancel($1)", f.pending_run)
        elif name.startswith("public.restore_job_lines"):
            await conn.execute("select public.restore_job_lines($1)", f.snapshot)
        elif name.startswith("public.invite_member"):
            await conn.execute("select public.invite_member($1, 'evil@example.test', 'admin')",
                               a.id)
        elif name.startswith("public.accept_invitation"):
            await conn.execute("select public.accept_invitation($1)", f.invitation)
        elif name.startswith("public.planner_run_queue_position"):
            await conn.fetch("select * from public.planner_run_queue_position($1)",
                             f.pending_run)
        elif name.startswith("planner_engine.claim_run"):
            rows = await conn.fetch("select * from planner_engine.claim_run('evil', $1)",
                                    f.pending_run)
            assert [str(r["organization_id"]) for r in rows] == [a.id]  # still A's run
        elif name.startswith("planner_engine.heartbeat"):
            row = await conn.fetchrow("select * from planner_engine.heartbeat($1, $2)",
                                      f.gen_run, forged)
            assert row is not None and row["lease_held"] is False
        elif name.startswith("planner_engine.load_problem"):
            await conn.fetchval("select planner_engine.load_problem($1, $2)", f.gen_run, forged)
        elif name == "planner_engine.commit_plan(A's run, forged lease)":
            await conn.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                               f.gen_run, forged, a.id, plan_json(a, a.terms))
        elif name == "planner_engine.commit_plan(A's run, own lease, B's org)":
            await conn.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                               f.gen_run, f.gen_lease, b.id, plan_json(b, f.b_terms))
        elif name == "planner_engine.commit_plan(own B run, A's teams)":
            await conn.execute("select planner_engine.commit_plan($1, $2, $3, $4, '{}')",
                               f.b_gen_run, f.b_gen_lease, b.id,
                               plan_json(a, f.b_terms))  # B's terms, A's teams
        elif name == "planner_engine.finish_run(A's run, forged lease)":
            await conn.execute("select planner_engine.finish_run($1, $2, 'FAILED')",
                               f.gen_run, forged)
        elif name.startswith("planner_engine.finish_run(A's run, the lease column"):
            await conn.execute("select planner_engine.finish_run($1, $2, 'FAILED')",
                               f.gen_run, f.gen_lease_column)
        elif name.startswith("planner_engine.write_logs([A's run, B's org"):
            n = await conn.fetchval(
                "select planner_engine.write_logs($1::jsonb)",
                json.dumps([{"planner_run_id": f.gen_run, "organization_id": b.id,
                             "level": "INFO", "message": "forged"}]))
            assert n == 0
        elif name.startswith("planner_engine.write_logs([A's run, forged lease"):
            n = await conn.fetchval(
                "select planner_engine.write_logs($1::jsonb)",
                json.dumps([{"planner_run_id": f.gen_run, "lease": forged,
                             "level": "CRITICAL", "message": "forged",
                             "logged_at": "2020-01-01T00:00:00Z"}]))
            assert n == 0
        elif name.startswith("planner_engine.pending_runs"):
            rows = await conn.fetch("select * from planner_engine.pending_runs(10)")
            assert [sorted(r.keys()) for r in rows] == [["created_at", "id"]] * len(rows)
            assert f.pending_run in {str(r["id"]) for r in rows}
        elif name.startswith("planner_engine.queue_positions"):
            rows = await conn.fetch("select * from planner_engine.queue_positions(10)")
            assert [sorted(r.keys()) for r in rows] == (
                [["estimated_start", "id", "runs_ahead"]] * len(rows))
            assert f.pending_run in {str(r["id"]) for r in rows}
        elif name.startswith("planner_engine.listener_heartbeat"):
            await conn.execute("select planner_engine.listener_heartbeat('evil')")
        elif name.startswith("planner_engine.sweep_stale_runs"):
            await conn.fetchval("select planner_engine.sweep_stale_runs()")
        elif name.startswith("planner_private.sweep_stale_runs"):
            await conn.fetchval(
                "select planner_private.sweep_stale_runs('0 seconds', '0 seconds')")
        elif name.startswith("planner_engine.broadcast(A's run, forged"):
            await conn.execute("select planner_engine.broadcast($1, $2, 'done', '{}')",
                               f.gen_run, forged)
        elif name.startswith("planner_engine.broadcast(A's run, the lease column"):
            await conn.execute("select planner_engine.broadcast($1, $2, 'done', '{}')",
                               f.gen_run, f.gen_lease_column)
        elif name.startswith("planner_engine.announce_queued"):
            n = await conn.fetchval(
                "select planner_engine.announce_queued($1::uuid[])",
                [f.pending_run, f.gen_run])
            assert n == 1
        elif name.startswith("planner_engine.refusal_counts"):
            rows = await conn.fetch("select * from planner_engine.refusal_counts()")
            assert [r["reason"] for r in rows] == sorted(REFUSAL_REASONS)
            assert all(list(r.keys()) == ["reason", "refusals"] for r in rows)
        elif name.startswith("planner_engine.self_check"):
            rows = await conn.fetch("select * from planner_engine.self_check(null)")
            text = json.dumps([dict(r) for r in rows])
            assert a.id not in text and b.id not in text and str(f.gen_run) not in text
        else:
            raise AssertionError(name)
        return "ok"

    return run


RPC_CELLS = [(name, actor) for name in EXPECTED_RPC for actor in ACTORS]


#: What a call that succeeds by design may change (inside its rolled-back transaction): run
#: ids whose state may differ afterwards. Every other successful call must change nothing.
MAY_CHANGE = {"planner_engine.claim_run(A's pending run)": "pending_run"}
RUN_STATE = ("select id, status, lease, attempts, heartbeat_at, finished_at, error,"
             " result_metadata from allocation_planner_runs order by id")
ROW_COUNTS = ("select (select count(*) from job_lines) as job_lines,"
              " (select count(*) from rotations) as rotations,"
              " (select count(*) from job_lines_history) as history,"
              " (select count(*) from planner_execution_logs) as logs,"
              " (select count(*) from allocation_planner_runs) as runs,"
              " (select count(*) from organization_members) as members,"
              " (select count(*) from organization_invitations) as invitations")


@pytest.mark.parametrize(("call", "actor"), RPC_CELLS,
                         ids=[f"{c.split('(')[0]}-{i}-{a}" for i, (c, a) in enumerate(RPC_CELLS)])
async def test_function_cell(pg: asyncpg.Connection, fx: Fixture, su: asyncpg.Connection,
                             call: str, actor: str) -> None:
    before = {r["id"]: r for r in await su.fetch(RUN_STATE)}
    counts = await su.fetchrow(ROW_COUNTS)
    seen: dict[str, Any] = {}

    async def after(conn: asyncpg.Connection) -> None:
        # Inside the cell's transaction, before its rollback: what the call itself changed.
        now = {r["id"]: r for r in await conn.fetch(RUN_STATE)}
        seen["changed"] = {str(i) for i in before.keys() | now.keys()
                           if before.get(i) != now.get(i)}
        seen["counts"] = await conn.fetchrow(ROW_COUNTS)

    expected = EXPECTED_RPC[call][ACTORS.index(actor)]
    got = await _as_actor(actor, fx, pg, _rpc(call, fx), after)
    assert got == expected, f"{actor} calling {call}: expected {expected}, got {got}"
    if got == "ok":
        allowed = {getattr(fx, MAY_CHANGE[call])} if call in MAY_CHANGE else set()
        assert seen["changed"] == allowed, f"{call} changed runs {seen['changed']}"
        assert seen["counts"] == counts, f"{call} wrote rows: {counts} -> {seen['counts']}"


async def test_matrix_is_complete_and_not_vacuous(su: asyncpg.Connection, fx: Fixture) -> None:
    """Every public table with RLS appears in the matrix, and A's rows really exist (so a
    `none` cell means hidden, not empty)."""
    rls_tables = {r[0] for r in await su.fetch(
        "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'public' and c.relkind = 'r' and c.relrowsecurity")}
    assert rls_tables <= set(EXPECTED), rls_tables - set(EXPECTED)
    for table in EXPECTED:
        if table in ("planner_rule_sets", "planner_engine.settings"):
            continue
        n = await su.fetchval(f"select count(*) from {table} where {_a_filter(table)}", fx.w.a.id)
        assert n > 0, f"organisation A has no row in {table}: the matrix would be vacuous"
    functions = {r[0] for r in await su.fetch(
        "select p.proname from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = 'planner_engine'")}
    covered = {c.split("(")[0].split(".")[1] for c in EXPECTED_RPC if c.startswith("planner_")}
    assert functions <= covered, functions - covered


def markdown() -> str:
    """The matrix as it is tested, for docs/reliability.md."""
    head = "| table | op | " + " | ".join(ACTORS) + " |"
    out = [head, "|---|---|" + "---|" * len(ACTORS)]
    for table, ops in EXPECTED.items():
        for op in OPS:
            out.append(f"| `{table}` | {op} | " + " | ".join(ops[op]) + " |")
    out += ["", "| function (A's objects) | " + " | ".join(ACTORS) + " |",
            "|---|" + "---|" * len(ACTORS)]
    for call, cells in EXPECTED_RPC.items():
        out.append(f"| `{call}` | " + " | ".join(cells) + " |")
    out += ["", "Why each `ok` is harmless:", ""]
    out += [f"- `{k}`: {v}" for k, v in RPC_NOTES.items()]
    out += ["", "Privileges, derived from the catalogue (`test_every_object_has_a_privilege_"
            "decision`; empty = none):", "",
            "| object | " + " | ".join(ROLES) + " |", "|---|" + "---|" * len(ROLES)]
    out += [f"| `{obj}` | " + " | ".join(f"`{p}`" if p else "" for p in privs) + " |"
            for obj, privs in PRIVILEGES.items()]
    out += ["", "Supabase's own objects, left as the project has them: "
            + ", ".join(f"`{o}`" for o in sorted(SUPABASE_OWNED)) + ".", "",
            "Policies (`test_every_policy_has_a_decision`):", "",
            "| table | policy | command | roles |", "|---|---|---|---|"]
    out += [f"| `{t}` | `{name}` | {cmd} | {roles} |"
            for (t, name), (cmd, roles) in POLICIES.items()]
    out += ["", "Reachable by an API role without a behavioural cell, and why:", ""]
    out += [f"- `{k}`: {v}" for k, v in REACHABLE_WITHOUT_CELLS.items()]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown())
