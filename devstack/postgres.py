"""A PostgreSQL 15 cluster with pg_cron and wal2json, in an ignored project folder.

PostgreSQL refuses to run as root, so when we are root the server runs as an unprivileged OS
user (`postgres`, created by Debian's package) through `runuser`. As any other user it runs as
that user directly. The cluster listens on loopback only, on a fixed non-default port, so it never
collides with a system PostgreSQL.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import psycopg2
from loguru import logger

from devstack.settings import DevSettings

WAL2JSON = "wal2json"


class DevStackError(RuntimeError):
    """A local-stack problem with a message a developer can act on."""


def _is_root() -> bool:
    return os.geteuid() == 0


def parse_describe_config(text: str) -> dict[str, str]:
    """`postgres --describe-config` as `{parameter: built-in default}` (tab-separated rows)."""
    params: dict[str, str] = {}
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) >= 5 and cols[0]:
            params[cols[0]] = cols[4]
    return params


def plugin_settings(known: Mapping[str, str]) -> dict[str, str]:
    """What lets replication connections use wal2json on this server binary.

    PostgreSQL 15.19 added `output_plugin_libraries` (default `pgoutput, test_decoding`):
    replication users may only load the output plugins it names. Servers that know the
    parameter get their own default plus wal2json; older ones must not see it at all (an
    unknown parameter stops the server from starting).
    """
    if "output_plugin_libraries" not in known:
        return {}
    libs = [x.strip() for x in known["output_plugin_libraries"].split(",") if x.strip()]
    if WAL2JSON not in libs:
        libs.append(WAL2JSON)
    return {"output_plugin_libraries": ", ".join(libs)}


def cluster_settings(s: DevSettings, known: Mapping[str, str]) -> dict[str, str]:
    """Every server setting the stack relies on, each as `SHOW` prints it."""
    return {
        "listen_addresses": s.host,
        "port": str(s.pg_port),
        "unix_socket_directories": str(s.run_dir),
        "max_connections": "300",
        "shared_preload_libraries": "pg_cron",
        "cron.database_name": s.database,
        "cron.use_background_workers": "on",
        "max_worker_processes": "32",
        "wal_level": "logical",
        "max_replication_slots": "64",
        "max_wal_senders": "64",
        **plugin_settings(known),
        # Development speed over crash safety: a clean (fast) shutdown still loses nothing.
        "fsync": "off",
        "full_page_writes": "off",
        # Stays on: wal2json (and so Realtime) only sees flushed WAL.
        "synchronous_commit": "on",
        "log_min_messages": "warning",
        "log_line_prefix": "%m [%p] %q%u@%d ",
    }


def render_conf(settings: Mapping[str, str]) -> str:
    lines = ["# Written by `planner dev up`; edits are overwritten."]
    for name, value in settings.items():
        quoted = value.replace("'", "''")
        lines.append(f"{name} = '{quoted}'")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Mismatch:
    """A setting whose effective value is not the one the stack wrote."""

    name: str
    wanted: str
    actual: str | None
    source: str | None
    pending_restart: bool

    def describe(self) -> str:
        where = f" (set in {self.source})" if self.source else ""
        return f"{self.name} is {self.actual!r}{where}, the stack needs {self.wanted!r}"


class Cluster:
    """One local cluster: init, start, stop, status. Every method is idempotent."""

    def __init__(self, settings: DevSettings) -> None:
        self.s = settings

    # -- process plumbing -------------------------------------------------------------------
    def _owner(self) -> pwd.struct_passwd:
        if _is_root():
            try:
                return pwd.getpwnam(self.s.os_user)
            except KeyError:
                subprocess.run(
                    ["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                     self.s.os_user],
                    check=True,
                )
                return pwd.getpwnam(self.s.os_user)
        return pwd.getpwuid(os.geteuid())

    def _cmd(self, *args: str) -> list[str]:
        if _is_root():
            return ["runuser", "-u", self.s.os_user, "--", *args]
        return list(args)

    def _bin(self, name: str) -> str:
        return str(self.s.pg_bindir / name)

    def _make_reachable(self, path: Path) -> None:
        """Let the server's OS user traverse every ancestor of `path` (execute bit only).

        A clean clone in a `mktemp -d` folder (mode 0700) is otherwise unreachable for it.
        """
        if not _is_root():
            return
        for parent in reversed(path.resolve().parents):
            mode = parent.stat().st_mode
            if not mode & 0o001:
                logger.info("granting traverse (o+x) on {} for the PostgreSQL user", parent)
                parent.chmod(mode | 0o001)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def initialised(self) -> bool:
        return (self.s.pgdata / "PG_VERSION").exists()

    def init(self) -> bool:
        """Create the cluster if absent. Returns True when it was created now."""
        self.s.state_dir.mkdir(parents=True, exist_ok=True)
        owner = self._owner()
        for d in (self.s.run_dir, self.s.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._make_reachable(self.s.state_dir)
        for d in (self.s.state_dir, self.s.run_dir, self.s.log_dir):
            os.chown(d, owner.pw_uid, owner.pw_gid)
        (self.s.state_dir / ".gitignore").write_text("*\n")
        if self.initialised:
            self._write_conf()
            return False
        if self.s.pgdata.exists():
            shutil.rmtree(self.s.pgdata)
        pwfile = self.s.run_dir / "pwfile"
        pwfile.write_text(self.s.superuser_password + "\n")
        os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        pwfile.chmod(0o600)
        try:
            subprocess.run(
                self._cmd(
                    self._bin("initdb"),
                    "-D", str(self.s.pgdata),
                    "-U", self.s.superuser,
                    f"--pwfile={pwfile}",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ),
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as exc:
            raise DevStackError(f"initdb failed:\n{exc.stdout}\n{exc.stderr}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.s.pgdata / "postgresql.conf").open("a") as fh:
            fh.write("\ninclude_if_exists = 'planner.conf'\n")
        self._write_conf()
        logger.info("created PostgreSQL cluster in {}", self.s.pgdata)
        return True

    # -- configuration ----------------------------------------------------------------------
    @cached_property
    def known_parameters(self) -> dict[str, str]:
        """The parameters this server binary knows (asked of the binary, not its version)."""
        res = subprocess.run([self._bin("postgres"), "--describe-config"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise DevStackError(
                f"{self._bin('postgres')} --describe-config failed: {res.stderr.strip()}")
        return parse_describe_config(res.stdout)

    @property
    def wanted_settings(self) -> dict[str, str]:
        return cluster_settings(self.s, self.known_parameters)

    def _write_conf(self) -> None:
        """(Re)write `planner.conf` when its content differs. A running server sees the change
        only after `reconcile()`, which compares effective values rather than files."""
        target = self.s.pgdata / "planner.conf"
        conf = render_conf(self.wanted_settings)
        if target.exists() and target.read_text() == conf:
            return
        target.write_text(conf)
        owner = self._owner()
        os.chown(target, owner.pw_uid, owner.pw_gid)

    def _query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        """One statement on a new superuser connection (a new session sees reloaded settings)."""
        conn = psycopg2.connect(self.s.dsn(), connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, args or None)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def mismatches(self) -> list[Mismatch]:
        """Settings whose effective value differs from `planner.conf`'s (running server only).

        `postgresql.auto.conf` (ALTER SYSTEM) or a command-line option can override the file.
        """
        wanted = self.wanted_settings
        rows = self._query(
            "select name, current_setting(name), coalesce(sourcefile, source), pending_restart"
            " from pg_settings where name = any(%s)",
            list(wanted),
        )
        current = {str(r[0]): r for r in rows}
        found = []
        for name, value in wanted.items():
            row = current.get(name)
            actual = None if row is None else str(row[1])
            if actual != value:
                source = None if row is None or row[2] is None else str(row[2])
                found.append(Mismatch(name, value, actual, source, bool(row and row[3])))
        return found

    def overrides(self) -> list[Mismatch]:
        """Settings another configuration file (`postgresql.auto.conf`, written by ALTER
        SYSTEM) sets after `planner.conf`, to another value: they win at the next reload even
        when the running server does not show them yet (`pg_file_settings` reads the files)."""
        wanted = self.wanted_settings
        rows = self._query(
            "select name, setting, sourcefile from pg_file_settings"
            " where applied and name = any(%s) and sourcefile not like %s",
            list(wanted), "%/planner.conf",
        )
        return [Mismatch(str(name), wanted[str(name)], str(value), str(src), False)
                for name, value, src in rows if str(value) != wanted[str(name)]]

    def reconcile(self, timeout_s: float = 10.0) -> str | None:
        """Make a running server use `planner.conf`: reload, and restart when a changed setting
        needs it. Returns what was done ("reloaded", "restarted") or None when nothing was
        needed. Raises, naming the setting and where it comes from, when another file overrides
        it or the effective value still differs afterwards."""
        self._refuse(self.overrides())
        if not self.mismatches():
            return None
        self._query("select pg_reload_conf()")
        done = "reloaded"
        deadline = time.monotonic() + timeout_s
        left = self.mismatches()
        # A reload reaches new sessions a moment later; restart-only settings never change.
        while left and not all(m.pending_restart for m in left) and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.mismatches()
        if any(m.pending_restart for m in left):
            logger.info("restarting PostgreSQL for {}",
                        ", ".join(m.name for m in left if m.pending_restart))
            self.restart()
            done = "restarted"
            left = self.mismatches()
        self._refuse(left)
        return done

    @staticmethod
    def _refuse(found: list[Mismatch]) -> None:
        if not found:
            return
        worst = found[0]
        fix = (
            f"run `ALTER SYSTEM RESET {worst.name}` as the superuser, or `planner dev reset`"
            if worst.source and worst.source.endswith("postgresql.auto.conf")
            else "remove that override, or run `planner dev reset` for a new cluster"
        )
        raise DevStackError(f"{worst.describe()}; {fix}")

    def binary_version(self) -> str:
        """`15.20 (Debian 15.20-0+deb12u1)`: the installed server binary's version."""
        res = subprocess.run([self._bin("postgres"), "--version"], capture_output=True,
                             text=True, check=True)
        return res.stdout.strip().removeprefix("postgres (PostgreSQL) ")

    def server_version(self) -> str | None:
        """The running server's version (may be older than the binary after an upgrade)."""
        if not self.status():
            return None
        return str(self._query("show server_version")[0][0])

    def status(self) -> bool:
        """True when the server is running."""
        if not self.initialised:
            return False
        res = subprocess.run(
            self._cmd(self._bin("pg_ctl"), "status", "-D", str(self.s.pgdata)),
            capture_output=True,
        )
        return res.returncode == 0

    def start(self) -> bool:
        """Start the server if it is not running. Returns True when it was started now."""
        if self.status():
            return False
        self._pg_ctl_start("start")
        return True

    def restart(self) -> None:
        self._pg_ctl_start("restart", "-m", "fast")

    def _pg_ctl_start(self, action: str, *extra: str) -> None:
        logfile = self.s.log_dir / "postgres.log"
        res = subprocess.run(
            self._cmd(
                self._bin("pg_ctl"), action, "-D", str(self.s.pgdata), "-l", str(logfile),
                "-w", "-t", "60", *extra,
            ),
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            tail = logfile.read_text()[-2000:] if logfile.exists() else ""
            raise DevStackError(f"PostgreSQL did not {action}:\n{res.stdout}{res.stderr}\n{tail}")
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            res = subprocess.run(
                [self._bin("pg_isready"), "-h", self.s.host, "-p", str(self.s.pg_port), "-q"],
                capture_output=True,
            )
            if res.returncode == 0:
                return
            time.sleep(0.1)
        raise DevStackError(f"PostgreSQL on port {self.s.pg_port} not ready after {timeout_s}s")

    def stop(self, mode: str = "fast") -> bool:
        """Stop the server if running. Returns True when it was stopped now."""
        if not self.status():
            return False
        subprocess.run(
            self._cmd(self._bin("pg_ctl"), "stop", "-D", str(self.s.pgdata), "-m", mode, "-w"),
            check=True,
            capture_output=True,
        )
        return True

    def destroy(self) -> None:
        """Stop and delete all local data."""
        self.stop()
        if self.s.pgdata.exists():
            shutil.rmtree(self.s.pgdata)
