"""Logging: JSON lines on stdout for the hosting platform, and each run's records in the database.

Inside a run every record carries `planner_run_id`, `organization_id` and `planner_lease` (bound
with `logger.contextualize`). `RunLogSink` copies those records into a bounded in-memory buffer
that a background task writes to `planner_execution_logs` in batches through
`planner_engine.write_logs`, which writes a record only with its run's lease (or the run's last
lease, for a grace period after the run ended) and stamps it with the database's time. The
lease is a secret: it goes to the database only, never into the stdout line or the stored
context. The sink never blocks the event loop and never waits for the
database: through an outage it keeps up to `capacity` records and then drops the oldest,
counting every drop (metric `planner_log_records_dropped_total`).

`diagnose=False` everywhere: loguru would otherwise print local variable values in
tracebacks, which can include connection strings and keys.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any

from loguru import logger

from listener import metrics
from listener.backoff import Backoff

if TYPE_CHECKING:
    from loguru import Message, Record

    from listener.db import EngineDB


#: Context keys that never leave the process except to the database (the run's lease).
_SECRET_EXTRA = frozenset({"planner_lease"})
#: Context keys that address the record rather than describe it.
_ADDRESS_EXTRA = frozenset({"planner_run_id", "organization_id", *_SECRET_EXTRA})


def _json_line(record: Record) -> str:
    out: dict[str, Any] = {
        "ts": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
    }
    out.update({k: str(v) if not isinstance(v, int | float | bool) else v
                for k, v in record["extra"].items() if k not in _SECRET_EXTRA})
    if record["exception"] is not None:
        exc = record["exception"]
        out["exception"] = "".join(
            traceback.format_exception(exc.type, exc.value, exc.traceback)
        )
    return json.dumps(out, default=str)


def _stdout_json_sink(message: Message) -> None:
    sys.stdout.write(_json_line(message.record) + "\n")
    sys.stdout.flush()


class _InterceptHandler(logging.Handler):
    """Send the client libraries' stdlib logging through loguru (same format, same sinks)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def configure_stdout(level: str = "INFO", fmt: str = "json") -> None:
    logger.remove()
    if fmt == "json":
        logger.add(_stdout_json_sink, level=level, diagnose=False, backtrace=False)
    else:
        logger.add(
            sys.stderr, level=level, diagnose=False, backtrace=False,
            format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
                   "{message} <dim>{extra}</dim>",
        )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.WARNING, force=True)


class RunLogSink:
    """Bounded, non-blocking buffer of run log records, flushed to the database in batches."""

    def __init__(self, capacity: int = 10_000, batch: int = 200, interval_s: float = 0.5) -> None:
        self.capacity = capacity
        self.batch = batch
        self.interval_s = interval_s
        self._buf: collections.deque[dict[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self.dropped = 0
        self.written = 0
        self._handler_id: int | None = None

    # loguru calls this synchronously from whatever thread logged: append only.
    def __call__(self, message: Message) -> None:
        rec = message.record
        extra = rec["extra"]
        run_id = extra.get("planner_run_id")
        lease = extra.get("planner_lease")
        if not run_id or not lease:
            return
        tb = None
        if rec["exception"] is not None:
            e = rec["exception"]
            tb = "".join(traceback.format_exception(e.type, e.value, e.traceback))
        context = {k: v for k, v in extra.items() if k not in _ADDRESS_EXTRA}
        # No timestamp: the database stamps each line (a caller could back-date it otherwise).
        item = {
            "planner_run_id": str(run_id),
            "lease": str(lease),
            "level": rec["level"].name,
            "message": rec["message"],
            "context": json.loads(json.dumps(context, default=str)),
            "traceback": tb,
        }
        with self._lock:
            if len(self._buf) >= self.capacity:
                self._buf.popleft()
                self.dropped += 1
                metrics.LOG_RECORDS_DROPPED.inc()
            self._buf.append(item)

    def install(self, level: str = "INFO") -> None:
        self._handler_id = logger.add(self, level=level, diagnose=False, backtrace=False)

    def uninstall(self) -> None:
        if self._handler_id is not None:
            logger.remove(self._handler_id)
            self._handler_id = None

    def pending(self) -> int:
        return len(self._buf)

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            n = min(self.batch, len(self._buf))
            return [self._buf.popleft() for _ in range(n)]

    def _give_back(self, items: list[dict[str, Any]]) -> None:
        with self._lock:
            room = self.capacity - len(self._buf)
            keep = items[-room:] if room > 0 else []
            lost = len(items) - len(keep)
            if lost:
                self.dropped += lost
                metrics.LOG_RECORDS_DROPPED.inc(lost)
            self._buf.extendleft(reversed(keep))

    async def flush(self, db: EngineDB) -> bool:
        """Write everything buffered now. False when the database refused (records kept)."""
        while True:
            items = self._take()
            if not items:
                return True
            try:
                await db.write_logs(items)
            except Exception as exc:  # any DB/network error: keep the records, try later
                self._give_back(items)
                # Printed, not logged: logging here would feed the sink we are draining.
                print(f"run log flush failed, {len(items)} records kept: {exc}", file=sys.stderr)
                return False
            self.written += len(items)
            metrics.LOG_RECORDS_WRITTEN.inc(len(items))

    async def run(self, db: EngineDB, stop: asyncio.Event) -> None:
        """Flush every `interval_s` until `stop`; while the database refuses, wait a jittered,
        growing delay instead (`listener.backoff`, from `interval_s` up to 10 s)."""
        backoff = Backoff(self.interval_s, max(self.interval_s, 10.0))
        wait = self.interval_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
            if await self.flush(db):
                backoff.reset()
                wait = self.interval_s
            else:
                wait = backoff.next_delay()
        await self.flush(db)
