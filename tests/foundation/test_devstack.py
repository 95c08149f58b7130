"""`planner dev up|down|status|reset|env` on a throw-away stack beside the developer's one.

The side stack is a brand-new cluster (new state directory, other ports), so a PostgreSQL or
extension upgrade that breaks a fresh machine breaks this module on the first run after it.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import psycopg2
import psycopg2.extras
import pytest

from devstack import packages, stack
from devstack.postgres import Cluster
from devstack.settings import DevSettings
from listener.migrate import discover

PLANNER = str(Path(sys.executable).with_name("planner"))
SIDE_DSN = "postgresql://postgres:postgres@127.0.0.1:54339/postgres"
# Starts real components of its own (PostgreSQL, apt, uv): part of `make test` only.
pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def side_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    state = tmp_path_factory.mktemp("side-stack")
    env = {
        **os.environ,
        "PLANNER_DEV_STATE_DIR": str(state),
        "PLANNER_DEV_PG_PORT": "54339",
        "PLANNER_DEV_REALTIME_PORT": "54340",
    }
    yield env
    subprocess.run([PLANNER, "dev", "down"], env=env, capture_output=True, timeout=120)


def side_settings(env: dict[str, str]) -> DevSettings:
    return DevSettings(state_dir=Path(env["PLANNER_DEV_STATE_DIR"]), pg_port=54339,
                       realtime_port=54340)


def planner(env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([PLANNER, *args], env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert res.returncode == 0, (
            f"planner {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


def query(env: dict[str, str], sql: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(SIDE_DSN)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def test_up_is_idempotent_and_status_reports_it(side_stack: dict[str, str]):
    first = planner(side_stack, "dev", "up")
    assert "created PostgreSQL cluster" in first.stderr
    # Each migration is logged once, by the migration runner.
    for mig in discover():
        assert first.stderr.count(mig.path.name) == 1, first.stderr
    assert first.stderr.count("applied migration") == len(discover())
    second = planner(side_stack, "dev", "up")
    # The second call neither re-creates the cluster nor re-applies migrations.
    assert "created PostgreSQL cluster" not in second.stderr
    assert "applied migration" not in second.stderr
    st = json.loads(planner(side_stack, "dev", "status", "--json").stdout)
    assert st["postgres"]["running"] is True and st["postgres"]["port"] == 54339
    settings = query(side_stack, "show shared_preload_libraries")[0][0]
    assert settings == "pg_cron"
    assert query(side_stack, "show wal_level")[0][0] == "logical"
    assert query(side_stack, "show listen_addresses")[0][0] == "127.0.0.1"
    # PostgreSQL runs as the unprivileged OS user, never as root.
    pid = int(Path(side_stack["PLANNER_DEV_STATE_DIR"], "pgdata", "postmaster.pid")
              .read_text().split()[0])
    assert os.stat(f"/proc/{pid}").st_uid != 0


def test_down_then_up_keeps_data_and_reset_clears_it(side_stack: dict[str, str]):
    planner(side_stack, "dev", "up")
    query(side_stack, "create table keep_me (x int); insert into keep_me values (1)")
    planner(side_stack, "dev", "down")
    st = json.loads(planner(side_stack, "dev", "status", "--json").stdout)
    assert st["postgres"]["running"] is False
    planner(side_stack, "dev", "up")
    assert query(side_stack, "select x from keep_me") == [(1,)]
    planner(side_stack, "dev", "reset", "--yes")
    assert query(side_stack, "select to_regclass('public.keep_me')") == [(None,)]
    # Migrations are applied again after a reset.
    assert query(side_stack, "select count(*) from supabase_migrations.schema_migrations")[0][0] > 0


def test_env_prints_supabase_shaped_keys(side_stack: dict[str, str]):
    out = planner(side_stack, "dev", "env").stdout
    values = dict(
        line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line
    )
    assert set(values) >= {
        "DATABASE_URL", "PLANNER_DATABASE_URL", "SUPABASE_URL", "SUPABASE_ANON_KEY",
        "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET",
    }
    assert values["SUPABASE_URL"] == "http://127.0.0.1:54340"
    assert ":54339/" in values["DATABASE_URL"]
    secret = values["SUPABASE_JWT_SECRET"]
    assert secret == DevSettings().jwt_secret
    keys = (("SUPABASE_ANON_KEY", "anon"), ("SUPABASE_SERVICE_ROLE_KEY", "service_role"))
    for name, role in keys:
        claims = jwt.decode(values[name], secret, algorithms=["HS256"])
        assert claims["role"] == role and claims["iss"] and claims["exp"] > claims["iat"]


def test_up_and_status_show_the_versions_the_stack_runs_on(side_stack: dict[str, str]):
    up = planner(side_stack, "dev", "up").stdout
    st = json.loads(planner(side_stack, "dev", "status", "--json").stdout)
    found = st["versions"]
    assert set(found) == {"postgresql", "pg_cron", "wal2json"}
    assert all(found.values()), found  # Debian's dpkg knows all three here
    assert found == packages.installed_versions()
    for name, version in found.items():
        assert f"{name} {version}" in up
    # The running server is the installed binary (dev up restarts a stale one).
    binary = Cluster(side_settings(side_stack)).binary_version()
    running = query(side_stack, "show server_version")[0][0]
    assert st["postgres"]["server_version"] == binary == running
    text = planner(side_stack, "dev", "status").stdout
    assert f"running {binary}" in text and f"pg_cron {found['pg_cron']}" in text


def test_a_brand_new_cluster_streams_changes_through_wal2json(side_stack: dict[str, str]):
    """What the Realtime server does, on the replication protocol: a temporary wal2json slot
    sees a committed insert. PostgreSQL 15.19+ refuses this unless output_plugin_libraries
    names wal2json; `dev up` sets it exactly where the server binary knows the parameter."""
    planner(side_stack, "dev", "up")
    known = Cluster(side_settings(side_stack)).known_parameters
    if "output_plugin_libraries" in known:
        libs = query(side_stack, "show output_plugin_libraries")[0][0]
        assert "wal2json" in [x.strip() for x in str(libs).split(",")]
    query(side_stack, "create table if not exists wal2json_probe (id serial, note text)")
    repl = psycopg2.connect(
        SIDE_DSN, connection_factory=psycopg2.extras.LogicalReplicationConnection)
    try:
        cur = repl.cursor()
        cur.execute("CREATE_REPLICATION_SLOT wal2json_probe TEMPORARY LOGICAL wal2json")
        cur.start_replication(slot_name="wal2json_probe", decode=True,
                              options={"format-version": "2"})
        query(side_stack, "insert into wal2json_probe (note) values ('streamed')")
        deadline = time.monotonic() + 20
        seen: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            msg = cur.read_message()
            if msg is None:
                select.select([cur], [], [], 0.5)
                continue
            change = json.loads(msg.payload)
            if change.get("action") == "I" and change.get("table") == "wal2json_probe":
                seen.append(change)
                break
        assert seen, "no insert arrived on the wal2json slot within 20 s"
        assert {"name": "note", "type": "text", "value": "streamed"} in seen[0]["columns"]
    finally:
        repl.close()


def test_up_reloads_a_running_cluster_whose_settings_changed(side_stack: dict[str, str]):
    """A cluster started with an older planner.conf (as after upgrading to 15.19+): the next
    `dev up` reloads it, and restarts it when a changed setting needs a restart."""
    planner(side_stack, "dev", "up")
    settings = side_settings(side_stack)
    conf = settings.pgdata / "planner.conf"
    good = conf.read_text()
    # Reload-only: a server-default log_min_messages.
    conf.write_text(good.replace("log_min_messages = 'warning'", "log_min_messages = 'notice'"))
    query(side_stack, "select pg_reload_conf()")
    deadline = time.monotonic() + 10
    while query(side_stack, "show log_min_messages")[0][0] != "notice":
        assert time.monotonic() < deadline, "the side cluster did not reload"
        time.sleep(0.1)
    pid_before = int((settings.pgdata / "postmaster.pid").read_text().split()[0])
    out = planner(side_stack, "dev", "up")
    assert "PostgreSQL reloaded" in out.stderr
    assert query(side_stack, "show log_min_messages")[0][0] == "warning"
    assert int((settings.pgdata / "postmaster.pid").read_text().split()[0]) == pid_before
    # Restart-only: max_connections.
    conf.write_text(good.replace("max_connections = '300'", "max_connections = '200'"))
    Cluster(settings).restart()
    assert query(side_stack, "show max_connections")[0][0] == "200"
    out = planner(side_stack, "dev", "up")
    assert "PostgreSQL restarted" in out.stderr and "max_connections" in out.stderr
    assert query(side_stack, "show max_connections")[0][0] == "300"
    assert conf.read_text() == good


def test_up_names_an_alter_system_override_and_its_fix(side_stack: dict[str, str]):
    """postgresql.auto.conf beats planner.conf at the next reload: `dev up` refuses, naming
    the setting, the file and the fix, even before the running server shows the value."""
    planner(side_stack, "dev", "up")
    query(side_stack, "alter system set log_min_messages = 'error'")
    try:
        res = planner(side_stack, "dev", "up", ok=False)
        assert res.returncode == 1
        err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1, res.stderr
        assert "log_min_messages is 'error' (set in " in err[0]
        assert "postgresql.auto.conf" in err[0]
        assert "ALTER SYSTEM RESET log_min_messages" in err[0]
        assert "Traceback" not in res.stderr
    finally:
        query(side_stack, "alter system reset log_min_messages")
    planner(side_stack, "dev", "up")
    assert query(side_stack, "show log_min_messages")[0][0] == "warning"


def test_realtime_failure_prints_its_last_error_and_what_to_do(side_stack: dict[str, str]):
    planner(side_stack, "dev", "up")
    planner(side_stack, "dev", "down")
    with socket.socket() as squatter:  # something else holds the Realtime port
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", 54340))
        squatter.listen()
        res = planner(side_stack, "dev", "up", ok=False)
    assert res.returncode == 1
    err = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1, res.stderr
    assert err[0].startswith("error: the Realtime server exited with 1: OSError")
    assert "address already in use" in err[0]
    assert "set PLANNER_DEV_REALTIME_PORT to a free port" in err[0]
    assert "realtime.log" in err[0] and "Traceback" not in res.stderr
    planner(side_stack, "dev", "up")  # the port is free again


def test_a_package_upgrade_stops_the_local_stack_before_apt_runs(
    side_stack: dict[str, str], monkeypatch: pytest.MonkeyPatch,
):
    """`planner dev packages --upgrade` (CI's bootstrap) with apt replaced by a recorder that
    reports a pending PostgreSQL upgrade: the side stack is down when apt would install."""
    planner(side_stack, "dev", "up")
    settings = side_settings(side_stack)
    seen: list[tuple[str, bool]] = []

    def fake_apt(*args: str) -> None:
        running = Cluster(settings).status() or stack.RealtimeProcess(settings).pid() is not None
        seen.append((args[0], running))

    pending = {n: packages.PackageState(n, "1", "1") for n in packages.DEBIAN_PACKAGES}
    pending["postgresql-15"] = packages.PackageState("postgresql-15", "15.18", "15.20")
    monkeypatch.setattr(packages.os, "geteuid", lambda: 0)
    monkeypatch.setattr(packages, "_apt", fake_apt)
    monkeypatch.setattr(packages, "query_states", lambda: pending)
    assert stack.install_packages(upgrade=True, settings=settings) == ["postgresql-15"]
    assert seen == [("update", True), ("install", False)]
    planner(side_stack, "dev", "up")
    assert Cluster(settings).status()
