"""`planner migrate` refuses a transaction-mode pooler and works through a session-mode one.

A real PgBouncer (Debian's `pgbouncer`, one of the packages `planner dev packages` installs)
runs in front of the stack's PostgreSQL, as the unprivileged OS user when we are root
(PgBouncer refuses to run as root), on a free port.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest

from devstack.settings import DevSettings
from listener import migrate
from tests.foundation.test_migrate import one_error_line, scaffold
from tests.support.databases import cloned_database, drop_database
from tests.support.realtime import free_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _logs(tmp: Path) -> str:
    return " | ".join(p.read_text(errors="replace") for p in tmp.glob("*.log"))


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], tmp: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"pgbouncer exited: {_logs(tmp)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"pgbouncer did not listen: {_logs(tmp)}")


@contextmanager
def pgbouncer(settings: DevSettings, database: str, mode: str) -> Iterator[str]:
    """A PgBouncer in `mode` for `database` (and any other database of the stack, such as the
    cron database); yields the DSN of `database` through it. Its files
    are in a folder of its own under /tmp (pytest's tmp_path is private to root)."""
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="planner-pgbouncer-"))
    tmp.chmod(0o755)
    (tmp / "userlist.txt").write_text(
        f'"{settings.superuser}" "{settings.superuser_password}"\n')
    log = tmp / "pgbouncer.log"
    (tmp / "pgbouncer.ini").write_text(f"""[databases]
{database} = host={settings.host} port={settings.pg_port} dbname={database}
* = host={settings.host} port={settings.pg_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {tmp / "userlist.txt"}
pool_mode = {mode}
default_pool_size = 4
logfile = {log}
pidfile = {tmp / "pgbouncer.pid"}
""")
    cmd = [PGBOUNCER, str(tmp / "pgbouncer.ini")]
    if os.geteuid() == 0:
        user = pwd.getpwnam(settings.os_user)
        for path in tmp.iterdir():
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chown(tmp, user.pw_uid, user.pw_gid)
        cmd = ["runuser", "-u", settings.os_user, "--", *cmd]
    with open(tmp / "stderr.log", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_for_port(port, proc, tmp)
        yield (f"postgresql://{settings.superuser}:{settings.superuser_password}"
               f"@127.0.0.1:{port}/{database}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def bare_db(dev_settings: DevSettings) -> str:
    """A database with only the Supabase scaffolding (as a fresh hosted project)."""
    async with cloned_database(dev_settings, prefix="p") as _:
        pass  # (only to build the template once; the test needs an unmigrated database)
    name = f"p_{os.urandom(6).hex()}"
    admin = await asyncpg.connect(dev_settings.dsn())
    try:
        await admin.execute(f'create database "{name}"')
    finally:
        await admin.close()
    await scaffold(dev_settings.dsn(name))
    return name


async def test_migrate_refuses_a_transaction_pooler_and_applies_nothing(
    dev_settings: DevSettings, bare_db: str
):
    try:
        with pgbouncer(dev_settings, bare_db, "transaction") as dsn:
            with pytest.raises(migrate.MigrationError, match="pooler in transaction mode"):
                await migrate.migrate(dsn, cron_database=dev_settings.database)
            planner = Path(sys.executable).with_name("planner")
            res = subprocess.run(
                [str(planner), "migrate", "--database-url", dsn,
                 "--cron-database", dev_settings.database],
                capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, res.stdout + res.stderr
        line = one_error_line(res.stderr)
        assert "transaction mode" in line and "session pooler" in line and "direct" in line
        conn = await asyncpg.connect(dev_settings.dsn(bare_db))
        try:  # refused before anything ran
            assert await conn.fetchval("select to_regnamespace('planner_engine')") is None
        finally:
            await conn.close()
    finally:
        await drop_database(dev_settings, bare_db)


async def test_migrate_works_through_a_session_pooler(
    dev_settings: DevSettings, bare_db: str
):
    try:
        with pgbouncer(dev_settings, bare_db, "session") as dsn:
            done = await migrate.migrate(dsn, cron_database=dev_settings.database)
        assert [m.version for m in done] == [m.version for m in migrate.discover()]
    finally:
        await drop_database(dev_settings, bare_db)
