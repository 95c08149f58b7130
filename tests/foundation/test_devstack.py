"""`planner dev up|down|status|reset|env` on a throw-away stack beside the developer's one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jwt
import psycopg2
import pytest

from devstack.settings import DevSettings

PLANNER = str(Path(sys.executable).with_name("planner"))


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


def planner(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([PLANNER, *args], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"planner {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res


def query(env: dict[str, str], sql: str) -> list[tuple[object, ...]]:
    conn = psycopg2.connect("postgresql://postgres:postgres@127.0.0.1:54339/postgres")
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
    second = planner(side_stack, "dev", "up")
    # The second call neither re-creates the cluster nor re-applies migrations.
    assert "created PostgreSQL cluster" not in second.stderr
    assert "migration applied" not in second.stderr
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
