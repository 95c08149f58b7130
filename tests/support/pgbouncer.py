"""A real PgBouncer (Debian's package) in front of one test database, in transaction mode.

Hosted Supabase's pooler on port 6543 hands each *transaction* to any server connection, which
is what breaks named prepared statements; PgBouncer with `pool_mode = transaction` does the
same, so the listener's pooler setting is tested against it. PgBouncer refuses to run as root:
as root it is started with `-u nobody`, its files in a folder that user can read.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from devstack.settings import DevSettings
from tests.support.realtime import free_port

PGBOUNCER = "/usr/sbin/pgbouncer"
UNPRIVILEGED = "nobody"


class PgBouncer:
    def __init__(self, settings: DevSettings, database: str, *, pool_mode: str = "transaction",
                 pool_size: int = 2, any_database: bool = False) -> None:
        self.settings = settings
        self.database = database
        #: also route every other database of the server (`planner migrate --cron-database`
        #: reaches the cron database through the same pooler)
        self.any_database = any_database
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def dsn(self, role: str, password: str) -> str:
        return f"postgresql://{role}:{password}@127.0.0.1:{self.port}/{self.database}"

    def engine_dsn(self) -> str:
        return self.dsn(self.settings.engine_role, self.settings.engine_password)

    def _write_config(self) -> Path:
        s = self.settings
        users = {s.engine_role: s.engine_password, s.superuser: s.superuser_password}
        (self.dir / "userlist.txt").write_text(
            "".join(f'"{u}" "{p}"\n' for u, p in users.items()))
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{self.database} = host={s.host} port={s.pg_port} dbname={self.database}\n"
            + (f"* = host={s.host} port={s.pg_port}\n" if self.any_database else "")
            + "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {self.dir / 'userlist.txt'}\n"
            f"pool_mode = {self.pool_mode}\ndefault_pool_size = {self.pool_size}\n"
            "max_client_conn = 100\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            "admin_users =\nignore_startup_parameters = extra_float_digits\n"
        )
        self.dir.chmod(0o755)
        for f in self.dir.iterdir():
            f.chmod(0o644)
        return ini

    def start(self, timeout_s: float = 15.0) -> None:
        ini = self._write_config()
        args = [PGBOUNCER, str(ini)]
        if os.geteuid() == 0:
            args[1:1] = ["-u", UNPRIVILEGED]
            shutil.chown(self.dir, user=UNPRIVILEGED)  # it writes its log file here
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"pgbouncer exited {self.proc.returncode}: {err}{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen on {self.port}: {self.log()}")

    def log(self) -> str:
        try:
            return (self.dir / "pgbouncer.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
