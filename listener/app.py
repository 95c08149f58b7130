"""The listener process: Realtime wake-ups -> claim the next run -> fenced writes.

    Realtime postgres_changes ─┐
    catch-up scan (30 s) ──────┼─> Wakeup ─> claim_run(worker) ─> RunExecutor ─> DB
    every (re)subscribe ───────┘   (the database picks the run:              │
                                    round robin across organisations)        │
                                                  progress broadcasts <──────┘

One solve at a time per process. Which run comes next is never decided here: events and scans
only wake the work loop, and `claim_run` without a run id takes the next run in the database's
order, the same for every replica. Queue positions broadcast to UIs are the database's answer
too (planner_engine.queue_positions). While it can claim, the listener beats
planner_engine.listener_heartbeat on its heartbeat interval: the sweeper fails a PENDING run
by timeout only when no listener did. SIGTERM/SIGINT: stop claiming, let the running solve finish
within the grace period, else hand it back (PENDING), flush the run logs, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from collections import OrderedDict
from collections.abc import Coroutine
from datetime import datetime
from typing import Any

from aiohttp import web
from loguru import logger

from listener import health, metrics, selfcheck
from listener.apikeys import KEY_VARIABLES, key_problem, key_variable
from listener.backoff import Backoff
from listener.broadcast import DbBroadcaster
from listener.db import EngineDB
from listener.errors import (
    CONNECT_ERRORS,
    ConfigurationError,
    describe_bind_error,
    describe_connect_error,
    where,
)
from listener.executor import RunExecutor
from listener.logs import RunLogSink
from listener.realtime_link import RealtimeLink
from listener.run_queue import Wakeup
from listener.settings import ListenerSettings
from listener.solving import ChildProcessSolver

#: How many hinted run ids the listener remembers to tell catch-up finds from known runs.
KNOWN_RUNS = 10_000


class Listener:
    def __init__(self, settings: ListenerSettings) -> None:
        self.s = settings
        self.wake = Wakeup()
        self.draining = asyncio.Event()  # set on SIGTERM: stop claiming
        self.stopped = asyncio.Event()  # set when background tasks must end
        self._resync = asyncio.Event()
        self._announced: dict[uuid.UUID, int] = {}
        self._queue_depth = 0  # PENDING runs at the last announcement (all organisations)
        #: run ids hinted so far (the newest KNOWN_RUNS): a catch-up hit is a run never heard of
        self._known: OrderedDict[uuid.UUID, None] = OrderedDict()
        self.db: EngineDB | None = None
        self.bc: DbBroadcaster | None = None
        self.link: RealtimeLink | None = None
        self.log_sink = RunLogSink(capacity=settings.log_buffer)
        self.current_run: uuid.UUID | None = None
        self._tasks: set[asyncio.Task[bool]] = set()  # fire-and-forget broadcasts
        self._resync_timer: asyncio.TimerHandle | None = None
        self._announce_timer: asyncio.TimerHandle | None = None
        #: set while the last self-check passed; cleared, claims pause and /readyz is 503.
        self.checks_ok = asyncio.Event()
        self.check_problems: list[str] = []

    # -- hints ------------------------------------------------------------------------------
    def hint(self, run_id: uuid.UUID, created_at: datetime) -> None:
        """A run looked PENDING (RealtimeLink's callback; `created_at` goes unused: the order
        is the database's)."""
        self._hint(run_id)

    def _hint(self, run_id: uuid.UUID) -> bool:
        """Wake the work loop for `run_id`; returns whether it was a new hint."""
        if self.draining.is_set() or run_id == self.current_run:
            return False
        self._known[run_id] = None
        self._known.move_to_end(run_id)
        while len(self._known) > KNOWN_RUNS:
            self._known.popitem(last=False)
        if self.wake.hint(run_id):
            logger.debug("run {} announced: claiming the next run", run_id)
            self._announce_queue()
            return True
        return False

    def resync(self) -> None:
        self._resync.set()

    def _resync_soon(self, delay_s: float = 1.0) -> None:
        """One catch-up scan `delay_s` from now (debounced)."""
        if self._resync_timer is None or self._resync_timer.cancelled():
            def fire() -> None:
                self._resync_timer = None
                self.resync()

            self._resync_timer = asyncio.get_running_loop().call_later(delay_s, fire)

    def _announce_queue(self) -> None:
        """Announce queue positions soon: at most one round per second, and in each round
        only the positions that changed (a burst would otherwise send n² broadcasts)."""
        if self._announce_timer is None:
            def fire() -> None:
                self._announce_timer = None
                self._announce_now()

            self._announce_timer = asyncio.get_running_loop().call_later(1.0, fire)

    def _announce_now(self) -> None:
        self._spawn(self._announce_positions())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _announce_positions(self) -> bool:
        """Broadcast the database's queue positions (planner_engine.queue_positions: the order
        claim_run follows, across every listener) where they changed since the last round."""
        assert self.bc is not None and self.db is not None
        try:
            rows = await self.db.queue_positions()
        except Exception as exc:  # best effort: the UI can ask the database itself
            logger.warning("queue positions unavailable: {}", exc)
            return False
        self._queue_depth = len(rows)
        metrics.QUEUE_DEPTH.set(len(rows))
        seen = set()
        changed = []
        for row in rows:
            seen.add(row.id)
            pos = row.runs_ahead + 1
            if self._announced.get(row.id) != pos:
                self._announced[row.id] = pos
                changed.append(row.id)
        if changed:
            # One call; the database sends what it computes itself (no lease before the claim).
            self._spawn(self.bc.announce_queued(changed))
        for gone in set(self._announced) - seen:
            del self._announced[gone]
        return True

    # -- loops ------------------------------------------------------------------------------
    async def _catch_up_loop(self) -> None:
        assert self.db is not None
        while not self.draining.is_set():
            try:
                pending = await self.db.pending_runs()
            except Exception as exc:
                logger.warning("catch-up scan failed: {}", exc)
                pending = []
            for run_id, _created_at in pending:
                missed = run_id not in self._known  # no event (or earlier scan) named it
                if self._hint(run_id) and missed:
                    metrics.CATCHUP_RUNS.inc()
            self._resync.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync.wait(), timeout=self.s.reconcile_interval_s)

    async def _listener_heartbeat_loop(self) -> None:
        """Tell the database this listener can take runs, every heartbeat interval while the
        self-check passes; a clean stop removes the row. On the event loop on purpose: a gap
        here means the loop itself was blocked (bench/flood_bench.py measures it)."""
        assert self.db is not None
        clock = asyncio.get_running_loop()
        due = clock.time()
        while not self.draining.is_set():
            if self.checks_ok.is_set():
                try:
                    await self.db.listener_heartbeat(self.s.worker_id)
                except Exception as exc:  # the pending TTL covers a long outage
                    logger.warning("listener heartbeat failed: {}", exc)
            # A fixed cadence: the round trip's time is not added to every interval.
            due = max(due + self.s.heartbeat_interval_s, clock.time())
            await self._pause(due - clock.time())
        with contextlib.suppress(Exception):
            await self.db.listener_heartbeat(self.s.worker_id, stopping=True)

    async def _self_check_loop(self, expected: str | None) -> None:
        """Repeat the start-up self-check: a role that lost a grant, or a database rolled
        back below this release's migrations, pauses claiming until it passes again."""
        assert self.db is not None
        while not self.draining.is_set():
            if await self._pause(self.s.self_check_interval_s):
                return
            try:
                result = await selfcheck.check(self.db, expected)
            except Exception as exc:  # the database is away: /readyz says so through ping
                logger.warning("self-check could not run: {}", exc)
                continue
            self._apply_checks(result)

    def _apply_checks(self, result: selfcheck.CheckResult) -> None:
        if result.ok:
            if not self.checks_ok.is_set() and self.check_problems:
                logger.info("self-check passes again: claiming resumes")
            self.check_problems = []
            self.checks_ok.set()
            return
        if result.errors != self.check_problems:
            for line in result.errors:
                logger.error("self-check failed, no new runs will be claimed: {}", line)
        self.check_problems = result.errors
        self.checks_ok.clear()

    async def _wait_checks_ok(self) -> bool:
        """Wait until the self-check passes (True) or the listener drains (False)."""
        if self.checks_ok.is_set():
            return True
        return await self._unless_draining(self.checks_ok.wait()) and not self.draining.is_set()

    async def _pause(self, seconds: float) -> bool:
        """Sleep up to `seconds`, cut short by a drain; returns whether the listener drains."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.draining.wait(), timeout=max(seconds, 0.0))
        return self.draining.is_set()

    async def _unless_draining(self, waiting: Coroutine[Any, Any, Any]) -> bool:
        """Await `waiting` unless a drain comes first: True when `waiting` finished (also if
        both did), False when the drain won (`waiting` is then cancelled)."""
        task = asyncio.create_task(waiting)
        drain = asyncio.create_task(self.draining.wait())
        await asyncio.wait({task, drain}, return_when=asyncio.FIRST_COMPLETED)
        drain.cancel()
        if task.done():
            return True
        task.cancel()
        return False

    async def _work_loop(self, executor: RunExecutor) -> None:
        assert self.db is not None
        claim_retry = Backoff(1.0, 10.0)  # jittered: replicas that lost the database spread out
        while not self.draining.is_set():
            if not await self._wait_checks_ok():
                break
            if not await self._unless_draining(self.wake.wait()):
                break
            hinted = self.wake.take()
            claim_started = asyncio.get_running_loop().time()
            try:
                # No run id: the database hands out the next run of its round robin.
                run = await self.db.claim(self.s.worker_id, None)
            except Exception as exc:
                delay = claim_retry.next_delay()
                logger.warning("claim failed: {}; will retry in {:.1f}s", exc, delay)
                await self._pause(delay)
                self.resync()
                continue
            claim_retry.reset()
            if run is None:
                # Other listeners took the hinted runs, or they are no longer PENDING, or (seen
                # with the local server, possible with any CDC) the event outran the insert's
                # visibility to new snapshots. A scan a moment later settles the last case.
                if hinted:
                    self._resync_soon()
                continue
            self._announce_queue()  # everyone behind it moved up
            self.current_run = run.id
            try:
                claim_s = asyncio.get_running_loop().time() - claim_started
                await executor.execute(run, self.draining, claim_s)
            finally:
                self.current_run = None
            self.wake.poke()  # more runs may be waiting: claim again straight away

    async def readiness(self) -> dict[str, Any]:
        db_ok = await self.db.ping() if self.db is not None else False
        return {
            "database": db_ok,
            # Ready once an insert is certain to wake us: subscribed AND the server said
            # "Subscribed to PostgreSQL" (before that, inserts produce no event at all).
            "realtime": bool(self.link and self.link.subscribed and self.link.changes_flowing),
            "realtime_state": self.link.state if self.link else "starting",
            # The engine role can do its work (planner_engine.self_check); while not, no claims.
            "self_check": self.checks_ok.is_set(),
            "self_check_problems": self.check_problems,
            # The database accepted the latest broadcast (False after a refusal such as a
            # missing grant, until one succeeds).
            "broadcast": self.bc is not None and self.bc.failure is None,
            "broadcast_failure": self.bc.failure if self.bc is not None else None,
            "queue_depth": self._queue_depth,
            "current_run": str(self.current_run) if self.current_run else None,
            "draining": self.draining.is_set(),
            "worker_id": self.s.worker_id,
            "log_records_dropped": self.log_sink.dropped,
        }

    async def refresh_metrics(self) -> None:
        """Re-read the database's refusal counters for /metrics (listener.metrics.REFUSALS)."""
        if self.db is not None:
            metrics.REFUSALS.update(await self.db.refusal_counts())

    # -- lifecycle --------------------------------------------------------------------------
    def request_shutdown(self, signame: str = "signal") -> None:
        if not self.draining.is_set():
            logger.info("{} received: no new runs will be claimed", signame)
            self.draining.set()

    async def _connect(self) -> EngineDB:
        """The engine's pool, or a ConfigurationError naming the variable to fix."""
        dsn = self.s.database_url.get_secret_value()
        try:
            return await EngineDB.connect(dsn, transaction_pooler=self.s.transaction_pooler)
        except CONNECT_ERRORS as exc:
            line = describe_connect_error(exc, dsn, "PLANNER_DATABASE_URL")
            if line is None:
                raise
            raise ConfigurationError(line) from None

    async def start_checks(self) -> tuple[EngineDB, str | None]:
        """Everything that must hold before the listener may claim a run: the key is of the
        service-role kind, the database answers, and the self-check passes. Raises
        ConfigurationError with one line naming the variable and the fix."""
        # Name the variable the key came from (SUPABASE_SECRET_KEY wins when both are set).
        found = key_variable(os.environ)
        variable = found[0] if found else KEY_VARIABLES[-1]
        problem = key_problem(self.s.service_role_key.get_secret_value(), variable)
        if problem:
            raise ConfigurationError(problem)
        db = await self._connect()
        expected = selfcheck.expected_version()
        try:
            result = await selfcheck.check(db, expected)
        except BaseException:
            await db.close()
            raise
        for line in result.warnings:
            logger.warning("{}", line)
        if not result.ok:
            await db.close()
            raise ConfigurationError(result.errors[0])
        self._apply_checks(result)
        return db, expected

    async def _serve_health(self) -> web.AppRunner | None:
        if not self.s.health_port:
            return None
        try:
            return await health.serve(self.readiness, self.s.health_host, self.s.health_port,
                                      self.refresh_metrics)
        except OSError as exc:
            raise ConfigurationError(
                describe_bind_error(exc, self.s.health_host, self.s.health_port)) from None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.db, expected = await self.start_checks()
        try:
            runner = await self._serve_health()
        except ConfigurationError:
            await self.db.close()
            raise
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown, sig.name)
        self.bc = DbBroadcaster(self.db)
        self.link = RealtimeLink(
            self.s.supabase_url, self.s.service_role_key.get_secret_value(),
            on_run=self.hint, on_subscribed=self.resync,
            stale_after_s=self.s.realtime_stale_after_s,
        )
        self.log_sink.install(self.s.log_level)
        logger.info(
            "listener {} started (heartbeat {}s, catch-up {}s, solver {} worker(s), {} MiB, "
            "database {}{})",
            self.s.worker_id, self.s.heartbeat_interval_s, self.s.reconcile_interval_s,
            self.s.solver_workers, self.s.solver_memory_mb,
            where(self.s.database_url.get_secret_value()),
            " through a transaction pooler" if self.s.transaction_pooler else "",
        )
        executor = RunExecutor(self.db, self.bc, ChildProcessSolver(self.s), self.s)
        background = [
            asyncio.create_task(self.link.run(self.stopped), name="realtime"),
            asyncio.create_task(self._catch_up_loop(), name="catch-up"),
            asyncio.create_task(self.log_sink.run(self.db, self.stopped), name="run-logs"),
            asyncio.create_task(self._self_check_loop(expected), name="self-check"),
            asyncio.create_task(self._listener_heartbeat_loop(), name="listener-heartbeat"),
        ]
        worker = asyncio.create_task(self._work_loop(executor), name="worker")
        try:
            await worker
        finally:
            self.draining.set()
            if not worker.done():
                worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await worker
            executor.close()
            self.stopped.set()
            for t in background:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(t, timeout=5)
            self.log_sink.uninstall()
            await self.log_sink.flush(self.db)
            if runner is not None:
                await runner.cleanup()
            if self._tasks:  # queue announcements still on their way to the database
                await asyncio.wait(set(self._tasks), timeout=3)
            await self.db.close()
            logger.info("listener {} stopped", self.s.worker_id)
        return 0
