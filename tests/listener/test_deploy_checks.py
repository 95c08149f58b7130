"""Deployment mistakes, made for real: `planner listen` (and the operator commands) as
subprocesses against the local stack or a closed port. Each expected failure prints ONE line
naming the fix, never a traceback; a running listener whose self-check fails stops claiming
and says so on /readyz until it passes again.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import asyncpg
import pytest

from devstack import keys
from devstack.seed import SeededOrganization
from devstack.settings import DevSettings
from listener.broadcast import DbBroadcaster
from listener.db import EngineDB
from tests.listener.conftest import ListenerFactory
from tests.support.harness import (
    PLANNER,
    TERMINAL,
    insert_run,
    listener_env,
    until,
    wait_for_status,
)
from tests.support.realtime import RealtimeServer, free_port

QUICK = {"time_limit_seconds": 1, "deterministic": True}


async def start_run(db: asyncpg.Connection, org: SeededOrganization) -> str:
    return await insert_run(
        db, user_id=org.planner.id, organization_id=org.id,
        allocation_run_id=org.allocation_run_id, n_job_lines=org.suggested_n_job_lines,
        constraints=list(org.suggested_constraints), options=QUICK)


def run_planner(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    res = subprocess.run([PLANNER, *args], env=env, capture_output=True, text=True,
                         timeout=timeout, stdin=subprocess.DEVNULL)
    return res.returncode, res.stdout, res.stderr


def assert_one_line(code: int, out: str, err: str, *expected: str) -> str:
    """Exit 1 or 2, no traceback anywhere, stderr exactly one line holding `expected`."""
    assert code in (1, 2), (code, out, err)
    assert "Traceback" not in out + err, out + err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def env(dev_settings: DevSettings, db_name: str, rt_server: RealtimeServer) -> dict[str, str]:
    """A working listener environment on this module's database; tests break one thing."""
    return listener_env(dev_settings, db_name, rt_server.url,
                        PLANNER_HEALTH_PORT=free_port(), PLANNER_WORKER_ID="deploy")


def with_url(env: dict[str, str], **parts: str) -> dict[str, str]:
    """The listener's database URL with parts replaced (host, port, password, query)."""
    from urllib.parse import urlsplit, urlunsplit

    url = urlsplit(env["PLANNER_DATABASE_URL"])
    user = url.username or ""
    password = parts.get("password", url.password or "")
    host = parts.get("host", url.hostname or "")
    port = parts.get("port", str(url.port))
    netloc = f"{user}:{password}@{host}:{port}"
    dsn = urlunsplit((url.scheme, netloc, parts.get("path", url.path), parts.get("query", ""),
                      ""))
    return {**env, "PLANNER_DATABASE_URL": dsn}


def closed_port() -> str:
    """A port nothing listens on (taken from the kernel, then released)."""
    return str(free_port())


@pytest.mark.parametrize("case, expected", [
    ("port closed", ("connection refused", "PLANNER_DATABASE_URL", "port")),
    ("wrong password", ("refused the password of role planner_engine",
                        "fix the password in PLANNER_DATABASE_URL")),
    ("unknown host", ("unknown database host in PLANNER_DATABASE_URL",)),
    ("ssl refused", ("does not accept TLS", "sslmode=require", "PLANNER_DATABASE_URL")),
    ("no such database", ('database "nope_', "PLANNER_DATABASE_URL")),
])
def test_database_mistakes_are_one_line(env: dict[str, str], case: str,
                                        expected: tuple[str, ...]):
    broken = {
        "port closed": lambda: with_url(env, port=closed_port()),
        "wrong password": lambda: with_url(env, password="wrong"),
        "unknown host": lambda: with_url(env, host="no-such-host.invalid"),
        "ssl refused": lambda: with_url(env, query="sslmode=require"),
        "no such database": lambda: with_url(env, path="/nope_db"),
    }[case]()
    assert_one_line(*run_planner(broken, "listen"), *expected)


def test_settings_mistakes_name_the_variable(env: dict[str, str]):
    line = assert_one_line(*run_planner(
        {**env, "PLANNER_HEARTBEAT_INTERVAL_S": "600", "PLANNER_LOG_FORMAT": "xml"}, "listen"),
        "PLANNER_HEARTBEAT_INTERVAL_S", "PLANNER_LOG_FORMAT")
    assert "heartbeat_interval_s" not in line
    missing = {k: v for k, v in env.items() if k != "SUPABASE_SERVICE_ROLE_KEY"}
    assert_one_line(*run_planner(missing, "listen"),
                    "SUPABASE_SECRET_KEY or SUPABASE_SERVICE_ROLE_KEY is not set")
    assert_one_line(*run_planner({**env, "PLANNER_DATABASE_URL": "notaurl"}, "listen"),
                    "PLANNER_DATABASE_URL: must be a postgresql:// URL")


@pytest.mark.parametrize("args", [("migrate",), ("runs", "list"), ("history", "list")])
def test_operator_commands_refuse_a_url_that_is_not_one(env: dict[str, str],
                                                        args: tuple[str, ...]):
    assert_one_line(*run_planner(env, *args, "--database-url", "notaurl"),
                    "not a postgresql:// URL", "--database-url")
    closed = f"postgresql://postgres:postgres@127.0.0.1:{closed_port()}/postgres"
    assert_one_line(*run_planner(env, *args, "--database-url", closed),
                    "connection refused", "DATABASE_URL")


@pytest.mark.parametrize("variable, key, expected", [
    ("SUPABASE_SERVICE_ROLE_KEY", "anon", "holds a JWT with role anon"),
    ("SUPABASE_SECRET_KEY", keys.LOCAL_PUBLISHABLE_KEY, "holds a publishable key"),
    ("SUPABASE_SERVICE_ROLE_KEY", "garbage", "neither an sb_secret_ key nor a JWT"),
])
def test_a_key_of_the_wrong_kind_is_refused_at_start(
    env: dict[str, str], dev_settings: DevSettings, variable: str, key: str, expected: str,
):
    """Issue 15: the anon key used to pass as healthy while every broadcast was dropped."""
    value = keys.api_key("anon", dev_settings.jwt_secret) if key == "anon" else key
    line = assert_one_line(*run_planner({**env, variable: value}, "listen"),
                           f"error: {variable} holds", expected, "sb_secret_", "service_role")
    assert value not in line


def test_health_port_in_use_is_one_line(env: dict[str, str]):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line(*run_planner({**env, "PLANNER_HEALTH_PORT": str(port)}, "listen"),
                        f"health port {port}", "already in use", "PLANNER_HEALTH_PORT")


@pytest.fixture
def empty_database(dev_settings: DevSettings) -> Iterator[str]:
    """A database nobody migrated (the engine role may connect: PUBLIC has CONNECT)."""
    import asyncio
    import uuid

    name = f"unmigrated_{uuid.uuid4().hex[:10]}"

    async def sql(statement: str) -> None:
        conn = await asyncpg.connect(dev_settings.dsn())
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(sql(f'create database "{name}"'))
    try:
        yield name
    finally:
        asyncio.run(sql(f'drop database if exists "{name}" with (force)'))


def test_an_unmigrated_database_is_refused(env: dict[str, str], empty_database: str):
    assert_one_line(*run_planner(with_url(env, path=f"/{empty_database}"), "listen"),
                    "not migrated", "run `planner migrate`")


async def test_the_database_must_be_at_this_releases_migration(
    env: dict[str, str], db: asyncpg.Connection,
):
    """A database behind the release (here: its newest migration record removed) is refused
    at start, naming the version it is at and the one needed."""
    newest = await db.fetchrow("select * from supabase_migrations.schema_migrations"
                               " order by version desc limit 1")
    await db.execute("delete from supabase_migrations.schema_migrations where version = $1",
                     newest["version"])
    try:
        assert_one_line(*run_planner(env, "listen"), "not migrated for this release",
                        f"this listener needs {newest['version']}", "planner migrate")
    finally:
        await db.execute(
            "insert into supabase_migrations.schema_migrations (version, name, statements)"
            " values ($1, $2, $3)", newest["version"], newest["name"], newest["statements"])


async def test_superuser_login_warns_and_runs(
    listeners: ListenerFactory, dev_settings: DevSettings, db_name: str,
):
    """A superuser DSN works, but the listener says to use the least-privilege role."""
    listener = listeners("SU", PLANNER_DATABASE_URL=dev_settings.dsn(db_name),
                         PLANNER_LOG_LEVEL="info")
    record = await listener.wait_record("logs in as a privileged role")
    assert record["level"] == "WARNING" and "planner_engine" in record["message"]
    await listener.wait_ready()


async def test_a_failed_recheck_pauses_claims_until_it_passes(
    listeners: ListenerFactory, db: asyncpg.Connection, org: SeededOrganization,
):
    """While running: the engine role loses EXECUTE on claim_run. /readyz turns 503 naming
    it, a new run waits in the queue unclaimed; granted back, the run is solved."""
    listener = listeners("RC", PLANNER_SELF_CHECK_INTERVAL_S="0.3")
    await listener.wait_ready()
    fn = "planner_engine.claim_run(text, uuid)"
    await db.execute(f"revoke execute on function {fn} from planner_engine")
    try:
        def failing() -> dict[str, object] | None:
            status, ready = listener.readiness()
            return ready if status == 503 and ready.get("self_check") is False else None

        ready = await until(failing, 15, listener.log)
        assert any("claim_run" in p for p in ready["self_check_problems"]), ready  # type: ignore[union-attr]
        assert ready["database"] is True and ready["realtime"] is True
        run_id = await start_run(db, org)

        def queued() -> int | None:
            _, ready = listener.readiness()
            return 1 if ready.get("queue_depth", 0) >= 1 else None

        await until(queued, 15, listener.log)  # heard and queued, yet not claimed:
        row = await db.fetchrow("select status, attempts from allocation_planner_runs"
                                " where id = $1", run_id)
        assert row is not None and (row["status"], row["attempts"]) == ("PENDING", 0)
    finally:
        await db.execute(f"grant execute on function {fn} to planner_engine")
    row = await wait_for_status(db, run_id, TERMINAL, 60)
    assert row["status"] == "COMPLETED"
    await listener.wait_record("self-check passes again")
    await listener.wait_ready()


async def test_a_broadcast_the_database_refuses_is_reported(
    db: asyncpg.Connection, engine_url: str,
):
    """Progress goes out through planner_engine's functions: a role that lost EXECUTE on them
    drops every event, so the broadcaster records the refusal (what /readyz's `broadcast`
    reports) until a broadcast succeeds again."""
    import uuid

    fn = "planner_engine.announce_queued(uuid[])"
    engine = await EngineDB.connect(engine_url, max_size=1)
    bc = DbBroadcaster(engine)
    try:
        await db.execute(f"revoke execute on function {fn} from planner_engine")
        try:
            assert await bc.announce_queued([uuid.uuid4()]) is False
            assert bc.failure is not None and bc.failure.startswith("42501"), bc.failure
        finally:
            await db.execute(f"grant execute on function {fn} to planner_engine")
        assert await bc.announce_queued([uuid.uuid4()]) is True  # no such run: 0 sent
        assert bc.failure is None
    finally:
        await engine.close()


async def test_the_secret_key_runs_the_listener_end_to_end(
    listeners: ListenerFactory, db: asyncpg.Connection, org: SeededOrganization,
    rt_server: RealtimeServer,
):
    """An `sb_secret_` key in SUPABASE_SECRET_KEY (it wins over SUPABASE_SERVICE_ROLE_KEY):
    the listener subscribes with it, hears an insert, solves, and its progress broadcasts
    (apikey header only: an opaque key is no bearer token) reach the member on the run's
    private channel."""
    from tests.realtime.helpers import JsClient

    run_id = await start_run(db, org)
    member = JsClient(rt_server.url, org.planner.access_token)
    await member.start()
    try:
        await member.cmd(cmd="setAuth", token=org.planner.access_token)
        spec = {"config": {"private": True}, "broadcast": ["status", "progress", "done"]}
        assert await member.channel(f"planner_run:{run_id}", **spec) == "SUBSCRIBED"
        listener = listeners("SB", SUPABASE_SECRET_KEY=keys.LOCAL_SECRET_KEY)
        await listener.wait_ready()
        row = await wait_for_status(db, run_id, TERMINAL, 60)
        assert row["status"] == "COMPLETED", row
        done = await member.events.wait(
            lambda e: e.get("type") == "broadcast" and e["payload"]["event"] == "done", 10)
        assert done["payload"]["payload"]["status"] == "COMPLETED"
        _, ready = listener.readiness()
        assert ready.get("broadcast") is not False, ready
    finally:
        await member.close()
