"""Run the local Realtime server as a subprocess for one test database.

Used by tests/realtime and by other suites (the listener's end-to-end tests) that need a
Realtime server pointed at *their* module database rather than the developer's stack:

    with RealtimeServer(dev_settings, db_name) as rt:
        client = AsyncRealtimeClient(f"{rt.url}/realtime/v1", key)

`stop()` sends SIGTERM and waits; `start()` again reuses the same port (outage tests);
`kill()` is SIGKILL. The server logs to `<state_dir>/log/realtime-<database>-<port>.log`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from devstack.settings import REPO_ROOT, DevSettings

# Hosted's 100 events/s per tenant would throttle the listener's suites and the benchmarks
# (bursts of runs, progress broadcasts); they get this instead. `None` = hosted's default.
RAISED_EVENTS_PER_SECOND = 1_000_000


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RealtimeServer:
    """`python -m devstack.realtime` on a free loopback port for one database."""

    def __init__(
        self,
        settings: DevSettings,
        database: str,
        port: int | None = None,
        *,
        channel_error_backoff_ms: int = 200,
        connect_error_backoff_ms: int = 100,
        max_events_per_second: float | None = RAISED_EVENTS_PER_SECOND,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.database = database
        self.host = settings.host
        self.port = port or free_port(self.host)
        self.url = f"http://{self.host}:{self.port}"
        # Supabase waits 5 s / 2 s before refusing a join / connection; tests need not.
        self.args = (
            "--channel-error-backoff-ms", str(channel_error_backoff_ms),
            "--connect-error-backoff-ms", str(connect_error_backoff_ms),
            *(() if max_events_per_second is None
              else ("--max-events-per-second", str(max_events_per_second))),
            *extra_args,
        )
        self.logfile: Path = settings.log_dir / f"realtime-{database}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/realtime/v1/websocket"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until /healthz says the replication stream runs."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "devstack.realtime",
            "--host", self.host,
            "--port", str(self.port),
            "--database-url", self.settings.dsn(self.database),
            "--jwt-secret", self.settings.jwt_secret,
            *self.args,
        ]
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"realtime server exited with {self.proc.returncode}; see {self.logfile}:\n"
                    + self.logfile.read_text()[-3000:]
                )
            if self.healthy():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"realtime server not healthy after {timeout_s}s; see {self.logfile}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM and wait (the server closes sockets with 1001 and drops its slot)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(5)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.logfile.read_text()[-chars:]
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RealtimeServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
