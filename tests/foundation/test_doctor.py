"""`planner doctor` on the real local stack: it passes there, and fails naming the cause on a
database without pg_cron, an unmigrated database, a wrong key, and an engine role that is a
superuser or has grants the migrations do not give it.

Each failing case works on a database or role of its own (this module's clone, a scratch
database, a temporary role), so the stack's own database and the shared `planner_engine` role
are only read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from devstack import stack
from devstack.settings import DevSettings
from listener import doctor, migrate
from tests.support.databases import drop_database

PLANNER = Path(sys.executable).with_name("planner")
#: The variables doctor reads; each test sets exactly the ones it means.
_DOCTOR_VARS = ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
                "PLANNER_CRON_DATABASE")


def run_doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in _DOCTOR_VARS}
    return subprocess.run([str(PLANNER), "doctor", *args], capture_output=True, text=True,
                          timeout=120, env={**base, **env})


def as_report(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in res.stderr, res.stderr
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def test_doctor_passes_on_the_local_stack(dev_settings: DevSettings):
    env = stack.env(dev_settings)
    res = run_doctor({k: env[k] for k in ("DATABASE_URL", "SUPABASE_URL",
                                          "SUPABASE_SERVICE_ROLE_KEY")})
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    names = ["database", "schema", "pg_cron", "sweeper", "realtime publication", "engine role",
             "broadcast from the database", "realtime key", "realtime reachable",
             "private channels"]
    assert [line.split(":", 1)[0].split(None, 1)[1] for line in lines] == names, res.stdout
    assert all(line.startswith("ok ") for line in lines), res.stdout
    report = as_report(run_doctor({"DATABASE_URL": env["DATABASE_URL"]}, "--json"))
    assert report["ok"] and len(report["checks"]) == 7


def test_doctor_fails_on_a_database_without_pg_cron(dev_settings: DevSettings, db_name: str):
    """The module's clone is migrated, but pg_cron runs only in the stack's database."""
    res = run_doctor({"DATABASE_URL": dev_settings.dsn(db_name)}, "--json")
    assert res.returncode == 1
    checks = by_name(as_report(res))
    assert checks["schema"]["ok"]
    assert not checks["pg_cron"]["ok"]
    assert f"pg_cron is not installed in database {db_name}" in checks["pg_cron"]["detail"]
    assert "sweeper" not in checks
    # Told where pg_cron runs, doctor looks there; clones get no sweeper job of their own.
    res = run_doctor({"DATABASE_URL": dev_settings.dsn(db_name)}, "--json",
                     "--cron-database", dev_settings.database)
    checks = by_name(as_report(res))
    assert res.returncode == 1 and checks["pg_cron"]["ok"] and not checks["sweeper"]["ok"]
    assert "no pg_cron job runs planner_engine.sweep_stale_runs()" in checks["sweeper"]["detail"]


@pytest.fixture
async def unmigrated_db(dev_settings: DevSettings) -> AsyncIterator[str]:
    """A database with only what a fresh hosted project has (the scaffolding)."""
    from devstack.stack import SCAFFOLDING_SQL

    name = f"d_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(dev_settings.dsn())
    await admin.execute(f'create database "{name}"')
    await admin.close()
    try:
        conn = await asyncpg.connect(dev_settings.dsn(name))
        try:
            await conn.execute(SCAFFOLDING_SQL.read_text())
        finally:
            await conn.close()
        yield name
    finally:
        await drop_database(dev_settings, name)


def test_doctor_fails_on_an_unmigrated_database(dev_settings: DevSettings, unmigrated_db: str):
    res = run_doctor({"DATABASE_URL": dev_settings.dsn(unmigrated_db)})
    assert res.returncode == 1
    assert "Traceback" not in res.stderr, res.stderr
    fails = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert any(line.startswith("FAIL schema: not migrated") and "`planner migrate`" in line
               for line in fails), res.stdout
    # Every check answered with one line, none crashed on the missing objects.
    assert len(res.stdout.splitlines()) == 6, res.stdout


def test_doctor_fails_on_the_anon_key(dev_settings: DevSettings):
    env = stack.env(dev_settings)
    res = run_doctor({"SUPABASE_URL": env["SUPABASE_URL"],
                      "SUPABASE_SERVICE_ROLE_KEY": env["SUPABASE_ANON_KEY"]}, "--json")
    assert res.returncode == 1
    checks = by_name(as_report(res))
    assert not checks["realtime key"]["ok"]
    detail = checks["realtime key"]["detail"]
    assert "SUPABASE_SERVICE_ROLE_KEY" in detail and "role anon" in detail
    assert checks["realtime reachable"]["ok"]  # the anon key connects: that is the trap
    assert not checks["private channels"]["ok"]


def test_key_kinds():
    assert doctor.check_key("sb_secret_abc", "K").ok
    assert not doctor.check_key("sb_publishable_abc", "K").ok
    assert "neither a JWT" in doctor.check_key("nope", "K").detail


async def test_doctor_fails_on_a_superuser_engine_role(dev_settings: DevSettings, db_name: str):
    """A temporary superuser role checked as the engine role (roles are cluster-wide: the
    shared planner_engine is left alone)."""
    role = f"doctor_su_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(dev_settings.dsn(db_name))
    try:
        await conn.execute(f'create role "{role}" superuser')
        checks = await doctor.database_checks(dev_settings.dsn(db_name), engine_role=role)
        engine = {c.name: c for c in checks}["engine role"]
        assert not engine.ok and f"{role} is super" in engine.detail
    finally:
        await conn.execute(f'drop role if exists "{role}"')
        await conn.close()


async def test_doctor_names_an_extra_and_a_missing_grant(dev_settings: DevSettings, db_name: str):
    """Grants live in the database (the module's clone), so changing them here is private."""
    dsn = dev_settings.dsn(db_name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("grant insert on public.allocation_planner_runs to planner_engine")
        await conn.execute("revoke execute on function planner_engine.heartbeat(uuid, uuid)"
                           " from planner_engine")
        engine = {c.name: c for c in await doctor.database_checks(dsn)}["engine role"]
        assert not engine.ok
        assert "extra grant(s): INSERT on table allocation_planner_runs" in engine.detail \
            or "extra grant(s): INSERT on table public.allocation_planner_runs" in engine.detail
        assert "missing grant(s): EXECUTE on function planner_engine.heartbeat(uuid, uuid)" \
            in engine.detail
    finally:
        await conn.execute("revoke insert on public.allocation_planner_runs from planner_engine")
        await conn.execute("grant execute on function planner_engine.heartbeat(uuid, uuid)"
                           " to planner_engine")
        await conn.close()
    engine = {c.name: c for c in await doctor.database_checks(dsn)}["engine role"]
    assert engine.ok, engine.detail


async def test_doctor_names_a_wrong_replica_identity(dev_settings: DevSettings, db_name: str):
    dsn = dev_settings.dsn(db_name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("alter table public.allocation_planner_runs replica identity full")
        pub = {c.name: c for c in await doctor.database_checks(dsn)}["realtime publication"]
        assert not pub.ok
        assert "replica identity full, the migrations set default" in pub.detail
    finally:
        await conn.execute("alter table public.allocation_planner_runs replica identity default")
        await conn.close()


async def test_doctor_names_an_owner_that_cannot_broadcast(
    dev_settings: DevSettings, db_name: str,
):
    """realtime.send turns a refused insert into a WARNING, so an owner of
    planner_engine.broadcast that may not write realtime.messages would drop every UI event
    silently: doctor names it. (A temporary role, cluster-wide, dropped after.)"""
    dsn = dev_settings.dsn(db_name)
    role = f"doctor_owner_{uuid.uuid4().hex[:8]}"
    fn = "planner_engine.broadcast(uuid, uuid, text, jsonb)"
    conn = await asyncpg.connect(dsn)
    try:
        name = "broadcast from the database"
        ok = {c.name: c for c in await doctor.database_checks(dsn)}[name]
        assert ok.ok and "bypasses RLS" in ok.detail, ok.detail  # the local owner: a superuser
        await conn.execute(f'create role "{role}"; grant usage, create on schema'
                           f' planner_engine to "{role}"; alter function {fn} owner to "{role}"')
        check = {c.name: c for c in await doctor.database_checks(dsn)}[name]
        assert not check.ok and f"{role}, the owner of" in check.detail, check.detail
    finally:
        await conn.execute(f"alter function {fn} owner to current_user")
        await conn.execute(f'drop owned by "{role}"; drop role if exists "{role}"')
        await conn.close()


def test_expected_setup_is_read_from_the_schema_files():
    expected = doctor.expected_setup()
    assert expected.published == {"public.allocation_planner_runs"}
    assert expected.identities == {"public.allocation_planner_runs": "default"}
    assert ("function", "planner_engine.claim_run(text, uuid)", "execute") in expected.grants
    assert not any(g[2] in ("insert", "update", "delete") for g in expected.grants)


def test_doctor_with_nothing_to_check_says_what_to_set():
    res = run_doctor({})
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "DATABASE_URL" in res.stderr


async def test_doctor_wants_a_run_within_two_periods_once_one_has_passed(
    dev_settings: DevSettings, db_name: str
):
    """A sweeper job scheduled (from the cron database) for the module's clone, every 30
    minutes so that pg_cron does not run it while the test looks: inactive it fails; just
    scheduled it passes; scheduled two hours ago with no run it fails."""
    dsn = dev_settings.dsn(db_name)
    cron = await asyncpg.connect(dev_settings.dsn())
    conn = await asyncpg.connect(dsn)
    try:
        job = await migrate.schedule_sweeper_from(cron, db_name)
        await cron.execute("select cron.alter_job(jobid, schedule => '*/30 * * * *',"
                           " active => false) from cron.job where jobname = $1", job)
        await conn.execute("update planner_engine.settings set sweeper_scheduled_at = now()")
        sweeper = await doctor.check_sweeper(cron, conn)
        assert not sweeper.ok and "inactive" in sweeper.detail
        await cron.execute("select cron.alter_job(jobid, active => true) from cron.job"
                           " where jobname = $1", job)
        sweeper = await doctor.check_sweeper(cron, conn)
        assert sweeper.ok and "first run due within 1800 s" in sweeper.detail, sweeper.detail
        await conn.execute("update planner_engine.settings"
                           " set sweeper_scheduled_at = now() - interval '2 hours'")
        sweeper = await doctor.check_sweeper(cron, conn)
        assert not sweeper.ok and "has never run" in sweeper.detail, sweeper.detail
    finally:
        await cron.execute("select cron.unschedule(jobid) from cron.job where database = $1",
                           db_name)
        await cron.close()
        await conn.close()


def test_schedule_periods():
    assert doctor._period_s("* * * * *") == 60
    assert doctor._period_s("*/5 * * * *") == 300
    assert doctor._period_s("30 seconds") == 30
    assert doctor._period_s("0 3 * * *") is None
