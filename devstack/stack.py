"""`planner dev up|down|status|reset|env`: the whole local stand-in for a Supabase project.

Data flow on the local stack: PostgreSQL (tables, RLS, pg_cron sweeper, wal2json slot) ->
local Realtime server (postgres_changes, broadcast, presence) -> listener and UI clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg2
from loguru import logger

from devstack import keys, packages
from devstack.postgres import Cluster, DevStackError
from devstack.settings import DevSettings
from listener import migrate
from listener.ops import planner_command as planner_command  # hints of dev up and the demo

SCAFFOLDING_SQL = Path(__file__).resolve().parent / "sql" / "supabase_scaffolding.sql"


async def prepare_database(dsn: str, settings: DevSettings) -> list[str]:
    """Supabase scaffolding, then migrations, then local-only login for the engine role.

    Returns the names of migrations applied now. Safe to repeat. pg_cron runs only in the
    stack's own database (cron.database_name); for any other database of the cluster (the
    tests' template and scratch databases) the sweeper is scheduled from there, the explicit
    `planner migrate --cron-database` setting.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCAFFOLDING_SQL.read_text())
        done = await migrate.apply_all(conn, cron_dsn=settings.dsn(settings.database))
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
_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \| (?P<level>[A-Z]+) *\| [^|]*? - ")
_PROBLEM_LEVELS = {"WARNING", "ERROR", "CRITICAL"}


def last_error(log: str) -> str | None:
    """The last problem a log shows, on one line: the last WARNING/ERROR record (with its
    continuation lines, such as PostgreSQL's HINT) or, when an uncaught exception came later,
    that exception's line (not what asyncio printed about leftover futures after it)."""
    lines = log.splitlines()
    record_at = traceback_at = -1
    for i, line in enumerate(lines):
        m = _RECORD.match(line)
        if m and m["level"] in _PROBLEM_LEVELS:
            record_at = i
        elif line.startswith("Traceback (most recent call last):"):
            traceback_at = i
    if traceback_at > record_at:
        # The exception is the first unindented line after the frames.
        for line in lines[traceback_at + 1:]:
            if line.strip() and not line[0].isspace():
                return line.strip()
        return None
    if record_at >= 0:
        parts = [_RECORD.sub("", lines[record_at]).strip()]
        for line in lines[record_at + 1:]:
            if _RECORD.match(line):
                break
            if line.strip():
                parts.append(line.strip())
        return " ".join(parts)
    rest = [x.strip() for x in lines if x.strip()]
    return rest[-1] if rest else None


def realtime_hint(error: str | None, settings: DevSettings) -> str:
    """What to do about the Realtime server's last error."""
    text = (error or "").lower()
    if "may not be used as an output plugin" in text:
        return ("PostgreSQL refuses wal2json for replication: run `planner dev up` again "
                "(it adds wal2json to output_plugin_libraries) and check "
                "`SHOW output_plugin_libraries`")
    if "address already in use" in text or "errno 98" in text:
        return (f"port {settings.realtime_port} is taken: stop what uses it, or set "
                "PLANNER_DEV_REALTIME_PORT to a free port")
    if "password authentication failed" in text or "does not exist" in text:
        return "the cluster does not match this checkout: `planner dev reset` recreates it"
    if "connection refused" in text or "could not connect" in text:
        return (f"PostgreSQL is not answering on port {settings.pg_port}: check "
                "`planner dev status`, then run `planner dev up` again")
    return "fix the cause above, then run `planner dev up` again"


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
        log_from = self.logfile.stat().st_size if self.logfile.exists() else 0
        cmd = [
            sys.executable, "-m", "devstack.realtime",
            "--host", self.settings.host,
            "--port", str(self.settings.realtime_port),
            "--database-url", self.settings.dsn(),
            "--jwt-secret", self.settings.jwt_secret,
            # Hosted's 100 events/s per tenant would throttle the demo and the chaos
            # campaign, which drive bursts of runs through this stack (docs/realtime.md).
            "--max-events-per-second", "1000000",
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
                raise self._failure(f"exited with {proc.returncode}", log_from)
            if self.healthy():
                return True
            time.sleep(0.1)
        error = self._failure("did not become healthy", log_from)
        self.stop()
        raise error

    def _failure(self, what: str, log_from: int) -> DevStackError:
        """One line: what happened, the log's last error, what to do, where the log is."""
        with self.logfile.open("rb") as fh:
            fh.seek(log_from)
            error = last_error(fh.read().decode(errors="replace"))
        cause = f": {error}" if error else ""
        return DevStackError(
            f"the Realtime server {what}{cause} -- {realtime_hint(error, self.settings)} "
            f"(log: {self.logfile})"
        )

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
    packages.ensure(upgrade=False)
    cluster = Cluster(s)
    if cluster.init():
        logger.info("new cluster on port {}", s.pg_port)
    if cluster.start():
        logger.info("PostgreSQL started on {}:{}", s.host, s.pg_port)
    else:
        running, installed = cluster.server_version(), cluster.binary_version()
        if running != installed:
            logger.info("PostgreSQL {} is running but {} is installed: restarting", running,
                        installed)
            cluster.restart()
    done = cluster.reconcile()
    if done:
        logger.info("PostgreSQL {} to apply {}", done, s.pgdata / "planner.conf")
    asyncio.run(prepare_database(s.dsn(), s))
    rt = RealtimeProcess(s)
    if rt.start():
        logger.info("Realtime server started on {}:{}", s.host, s.realtime_port)
    return s


def install_packages(upgrade: bool, settings: DevSettings | None = None) -> list[str]:
    """Debian packages for the stack; with `upgrade`, the newest candidates. A running local
    stack is stopped first when apt is about to replace its binaries (`dev up` restarts it)."""
    s = settings or DevSettings()

    def stop_stack() -> None:
        if Cluster(s).status() or RealtimeProcess(s).pid() is not None:
            logger.info("stopping the local stack before the package upgrade")
            down(s)

    return packages.ensure(upgrade=upgrade, before_change=stop_stack)


def versions(settings: DevSettings | None = None) -> dict[str, str | None]:
    """Installed versions of PostgreSQL, pg_cron and wal2json (Debian's, where dpkg knows)."""
    found = packages.installed_versions()
    if found["postgresql"] is None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            found["postgresql"] = Cluster(settings or DevSettings()).binary_version()
    return found


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
    cluster = Cluster(s)
    running = cluster.status()
    server_version = None
    if running:
        with contextlib.suppress(psycopg2.Error, OSError):  # status answers even then
            server_version = cluster.server_version()
    return {
        "state_dir": str(s.state_dir),
        "versions": versions(s),
        "postgres": {
            "running": running,
            "port": s.pg_port,
            "initialised": cluster.initialised,
            "server_version": server_version,
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
        # The new kind of key (hosted projects have both kinds): the listener takes
        # SUPABASE_SECRET_KEY in place of SUPABASE_SERVICE_ROLE_KEY, and prefers it when both
        # are set.
        "SUPABASE_PUBLISHABLE_KEY": keys.LOCAL_PUBLISHABLE_KEY,
        "SUPABASE_SECRET_KEY": keys.LOCAL_SECRET_KEY,
    }
