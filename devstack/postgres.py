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
from pathlib import Path

from loguru import logger

from devstack.settings import DevSettings

DEBIAN_PACKAGES = ("postgresql-15", "postgresql-15-cron", "postgresql-15-wal2json")
PG_LIBDIR = Path("/usr/lib/postgresql/15/lib")


class DevStackError(RuntimeError):
    """A local-stack problem with a message a developer can act on."""


def _is_root() -> bool:
    return os.geteuid() == 0


def apt_command() -> str:
    return (
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
        + " ".join(DEBIAN_PACKAGES)
    )


def missing_packages(settings: DevSettings) -> list[str]:
    """Debian packages whose files are not on this machine."""
    missing = []
    if not (settings.pg_bindir / "postgres").exists():
        missing.append("postgresql-15")
    if not (PG_LIBDIR / "pg_cron.so").exists():
        missing.append("postgresql-15-cron")
    if not (PG_LIBDIR / "wal2json.so").exists():
        missing.append("postgresql-15-wal2json")
    return missing


def ensure_packages(settings: DevSettings) -> None:
    """Install PostgreSQL 15, pg_cron and wal2json from Debian if any is missing (root only)."""
    missing = missing_packages(settings)
    if not missing:
        return
    if not _is_root():
        raise DevStackError(
            f"missing Debian packages {', '.join(missing)}; install them as root with:\n  "
            + apt_command()
        )
    logger.info("installing Debian packages: {}", " ".join(DEBIAN_PACKAGES))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    still = missing_packages(settings)
    if still:
        raise DevStackError(f"apt-get finished but {', '.join(still)} is still missing")


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

    def _write_conf(self) -> None:
        """(Re)write the settings the stack relies on; picked up at the next start."""
        conf = f"""# Written by `planner dev up`; edits are overwritten.
listen_addresses = '{self.s.host}'
port = {self.s.pg_port}
unix_socket_directories = '{self.s.run_dir}'
max_connections = 300
shared_preload_libraries = 'pg_cron'
cron.database_name = '{self.s.database}'
cron.use_background_workers = on
max_worker_processes = 32
wal_level = logical
max_replication_slots = 64
max_wal_senders = 64
# Development speed over crash safety: a clean (fast) shutdown still loses nothing.
# synchronous_commit stays on: wal2json (and so Realtime) only sees flushed WAL.
fsync = off
synchronous_commit = on  # logical decoding only sees flushed WAL
full_page_writes = off
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
"""
        target = self.s.pgdata / "planner.conf"
        target.write_text(conf)
        owner = self._owner()
        os.chown(target, owner.pw_uid, owner.pw_gid)

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
        logfile = self.s.log_dir / "postgres.log"
        res = subprocess.run(
            self._cmd(
                self._bin("pg_ctl"), "start", "-D", str(self.s.pgdata), "-l", str(logfile),
                "-w", "-t", "60",
            ),
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            tail = logfile.read_text()[-2000:] if logfile.exists() else ""
            raise DevStackError(f"PostgreSQL did not start:\n{res.stdout}{res.stderr}\n{tail}")
        self.wait_ready()
        return True

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
