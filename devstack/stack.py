"""`planner dev up|down|status|reset|env`: the whole local stand-in for a Supabase project.

Data flow on the local stack: PostgreSQL (tables, RLS, pg_cron sweeper, wal2json slot) ->
local Realtime server (postgres_changes, broadcast, presence) -> listener and UI clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from loguru import logger

from devstack import keys
from devstack.postgres import Cluster, DevStackError, ensure_packages
from devstack.settings import DevSettings
from listener import migrate

SCAFFOLDING_SQL = Path(__file__).resolve().parent / "sql" / "supabase_scaffolding.sql"


async def prepare_database(dsn: str, settings: DevSettings) -> list[str]:
    """Supabase scaffolding, then migrations, then local-only login for the engine role.

    Returns the names of migrations applied now. Safe to repeat.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCAFFOLDING_SQL.read_text())
        done = await migrate.apply_all(conn)
        exists = await conn.fetchval(
            "select true from pg_roles where rolname = $1", settings.engine_role
        )
        if exists:
            # On a hosted project the operator sets this password; locally it is well known.
            await conn.execute(
                f'alter role "{settings.engine_role}" login password '
                f"'{settings.engine_password}'"
            )
        return [m.path.name for m in done]
    finally:
        await conn.close()


# -- the local Realtime server process -------------------------------------------------------
@dataclass
class RealtimeProcess:
    """The local Realtime server, run as `python -m devstack.realtime` in the background."""

    settings: DevSettings

    @property
    def pidfile(self) -> Path:
        return self.settings.run_dir / "realtime.pid"

    @property
    def logfile(self) -> Path:
        return self.settings.log_dir / "realtime.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        return pid

    def healthy(self) -> bool:
        url = f"http://{self.settings.host}:{self.settings.realtime_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def start(self, timeout_s: float = 20.0) -> bool:
        if self.pid() is not None and self.healthy():
            return False
        self.stop()
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "devstack.realtime",
            "--host", self.settings.host,
            "--port", str(self.settings.realtime_port),
            "--database-url", self.settings.dsn(),
            "--jwt-secret", self.settings.jwt_secret,
        ]
        with self.logfile.open("ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pidfile.write_text(str(proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DevStackError(
                    f"the Realtime server exited with {proc.returncode}; see {self.logfile}"
                )
            if self.healthy():
                return True
            time.sleep(0.1)
        raise DevStackError(f"the Realtime server did not become healthy; see {self.logfile}")

    def stop(self, timeout_s: float = 10.0) -> bool:
        pid = self.pid()
        if pid is None:
            self.pidfile.unlink(missing_ok=True)
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.05)
        if self.pid() is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        return True


# -- commands --------------------------------------------------------------------------------
def up(settings: DevSettings | None = None) -> DevSettings:
    """Install what is missing, start PostgreSQL and Realtime, apply scaffolding + migrations."""
    s = settings or DevSettings()
    ensure_packages(s)
    cluster = Cluster(s)
    if cluster.init():
        logger.info("new cluster on port {}", s.pg_port)
    if cluster.start():
        logger.info("PostgreSQL started on {}:{}", s.host, s.pg_port)
    applied = asyncio.run(prepare_database(s.dsn(), s))
    for name in applied:
        logger.info("migration applied: {}", name)
    rt = RealtimeProcess(s)
    if rt.start():
        logger.info("Realtime server started on {}:{}", s.host, s.realtime_port)
    return s


def down(settings: DevSettings | None = None) -> None:
    s = settings or DevSettings()
    RealtimeProcess(s).stop()
    Cluster(s).stop()


def reset(settings: DevSettings | None = None) -> DevSettings:
    """Drop every piece of local data and start clean."""
    s = settings or DevSettings()
    RealtimeProcess(s).stop()
    Cluster(s).destroy()
    return up(s)


def status(settings: DevSettings | None = None) -> dict[str, object]:
    s = settings or DevSettings()
    rt = RealtimeProcess(s)
    return {
        "state_dir": str(s.state_dir),
        "postgres": {
            "running": Cluster(s).status(),
            "port": s.pg_port,
            "initialised": Cluster(s).initialised,
        },
        "realtime": {"running": rt.pid() is not None and rt.healthy(), "port": s.realtime_port},
    }


def env(settings: DevSettings | None = None) -> dict[str, str]:
    """The environment a listener or a test needs to use the local stack."""
    s = settings or DevSettings()
    return {
        "DATABASE_URL": s.dsn(),
        "PLANNER_DATABASE_URL": s.engine_dsn(),
        "SUPABASE_URL": s.supabase_url,
        "SUPABASE_ANON_KEY": keys.api_key("anon", s.jwt_secret),
        "SUPABASE_SERVICE_ROLE_KEY": keys.api_key("service_role", s.jwt_secret),
        "SUPABASE_JWT_SECRET": s.jwt_secret,
    }
