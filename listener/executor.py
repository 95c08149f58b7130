"""One claimed run, start to finish: load, solve, conclude (write + announce), heartbeating.

The database fences every write on the run's lease, so the rules here are about *what* to
write, never about whether it is safe. Which ending means what is decided purely in
`listener.outcome`; `_conclude` is the one place that writes a result and announces it:

* plan found                -> `commit_plan` (snapshot + replace + COMPLETED, one transaction)
* proven infeasible         -> INFEASIBLE, with the solver's explanation in `result_metadata`
* user asked to cancel      -> CANCELLED
* shutdown past the grace   -> back to PENDING, so another listener takes it
* lease lost (swept)        -> nothing at all; the run is someone else's now
* anything else             -> FAILED with a one-line error on the run and the traceback in
                               `planner_execution_logs`

The executor talks to a `RunStore`, an `EventSink` and a `SolverRunner` (listener.ports), so
its state machine is tested against in-memory fakes (tests/listener/test_executor.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger
from pydantic import ValidationError

from listener import metrics
from listener.broadcast import ProgressThrottle
from listener.events import DoneEvent, Phase, ProgressEvent, RunStatus, StatusEvent, UiEvent
from listener.outcome import (
    LEASE_LOST,
    Outcome,
    Result,
    StopReason,
    decide,
    failed,
    invalid_input,
    metadata_of,
    requeued,
)
from listener.ports import ClaimedRun, EventSink, LeaseLost, RunningSolve, RunStore, SolverRunner
from listener.settings import ListenerSettings
from solver import Plan, Problem, SolverProcessError
from solver.estimate import memory_refusal


def _printable(part: object) -> str:
    """A field name as text; one with control characters (a junk key) shown escaped."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def summarise_validation(exc: ValidationError) -> str:
    """One line a manager can read: the first errors, without pydantic's URLs.

    Field names come from the input, so they are escaped when they hold line breaks or other
    control characters: the result is stored as the run's one-line `error`.
    """
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(_printable(p) for p in err.get("loc", ()) if p != "__root__")
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - 3
    line = "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
    return line.replace("\r", "\\r").replace("\n", "\\n")


@dataclass
class Lease:
    """What the run's heartbeat has learnt, shared with the solve supervision."""

    lost: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    solve: RunningSolve | None = None  # the solve to stop or kill, once there is one

    def attach(self, solve: RunningSolve) -> None:
        self.solve = solve
        if self.cancel_requested:
            solve.stop()

    def check(self, where: str) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"lease lost {where}")


class RunExecutor:
    """Executes claimed runs one at a time for the listener."""

    def __init__(
        self, store: RunStore, events: EventSink, solver: SolverRunner,
        settings: ListenerSettings,
    ) -> None:
        self.store = store
        self.events = events
        self.solver = solver
        self.s = settings
        self._sent: asyncio.Task[None] | None = None  # the last UI event, in order

    def close(self) -> None:
        self.solver.close()

    # -- UI events, in order, never delaying the run ----------------------------------------
    def _announce(self, run: ClaimedRun, event: UiEvent) -> None:
        self._in_order(lambda: self.events.publish(event, run.lease))

    def _in_order(self, make: Callable[[], Awaitable[Any]]) -> None:
        """Send a best-effort event after the previous one, without waiting for it here.

        Phase events sit between the claim and the first heartbeat (and between the last
        heartbeat and the commit). Awaiting them let a slow Realtime (up to 3 s per call)
        stretch the lease's unheartbeated window past a short sweeper TTL, so a live run
        was re-queued. Each send awaits the previous one, so events stay in order.
        """
        prev = self._sent

        async def send() -> None:
            if prev is not None:
                with contextlib.suppress(Exception):
                    await prev
            await make()

        self._sent = asyncio.create_task(send())

    async def _all_sent(self) -> None:
        if self._sent is not None:
            with contextlib.suppress(Exception):
                await self._sent

    # -- the run ------------------------------------------------------------------------------
    async def execute(
        self, run: ClaimedRun, draining: asyncio.Event, claim_s: float = 0.0
    ) -> Outcome:
        """Run to a final state. Never raises except CancelledError (after cleaning up)."""
        with logger.contextualize(planner_run_id=str(run.id),
                                  organization_id=str(run.organization_id),
                                  planner_lease=str(run.lease)):
            started = time.monotonic()
            timings: dict[str, float] = {"claim_ms": claim_s * 1000}
            try:
                async with self._heartbeat(run) as lease:
                    result = await self._attempt(run, draining, lease, timings)
                    outcome = await self._conclude(run, result, timings)
            except LeaseLost:
                outcome = await self._conclude(run, LEASE_LOST, timings)
            except asyncio.CancelledError:
                logger.warning("listener stopping: handing the run back to the queue")
                await asyncio.shield(self._conclude_safely(run, requeued(), timings))
                metrics.RUNS.labels(outcome=Outcome.REQUEUED.value).inc()
                raise
            except Exception as exc:
                logger.exception("run failed: {}", exc)
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                outcome = await self._conclude_safely(
                    run, failed(f"internal error: {error}"), timings)
            metrics.RUNS.labels(outcome=outcome.value).inc()
            overhead_ms = sum(timings.get(k, 0.0) for k in ("claim_ms", "load_ms", "commit_ms"))
            metrics.RUN_OVERHEAD_SECONDS.observe(overhead_ms / 1000)
            logger.bind(**{k: round(v, 2) for k, v in timings.items()},
                        overhead_ms=round(overhead_ms, 2)).info(
                "run finished: {} in {:.2f}s", outcome.value, time.monotonic() - started)
            if not draining.is_set():
                self.solver.prepare_next()
            return outcome

    @contextlib.asynccontextmanager
    async def _heartbeat(self, run: ClaimedRun) -> AsyncIterator[Lease]:
        """Keep the lease from the claim to the end of the run (load, solve and commit alike).

        A lost lease kills the solve (nothing will be written); a cancel request stops it.
        """
        lease = Lease()

        async def beat() -> None:
            clock = asyncio.get_running_loop()
            due = clock.time()
            while True:
                # A fixed cadence, not "sleep, then beat": a slow round trip (a loaded
                # database) must not add itself to every interval.
                due = max(due + self.s.heartbeat_interval_s, clock.time())
                await asyncio.sleep(due - clock.time())
                try:
                    got = await self.store.heartbeat(run.id, run.lease)
                except Exception as exc:  # the sweeper's TTL covers a long outage
                    logger.warning("heartbeat failed: {}", exc)
                    continue
                if not got.lease_held:
                    lease.lost.set()
                    if lease.solve is not None:
                        lease.solve.kill()
                    return
                if got.cancel_requested and not lease.cancel_requested:
                    lease.cancel_requested = True
                    if lease.solve is not None:
                        lease.solve.stop()

        task = asyncio.create_task(beat())
        try:
            yield lease
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _attempt(
        self, run: ClaimedRun, draining: asyncio.Event, lease: Lease, timings: dict[str, float]
    ) -> Result:
        """Load and solve; returns what to write (nothing is written here)."""
        logger.info("run claimed (attempt {}/{})", run.attempts, run.max_attempts)
        self._announce(run, StatusEvent(run_id=run.id, status=RunStatus.GENERATING,
                                   phase=Phase.LOADING))
        t0 = time.monotonic()
        raw = await self.store.load_problem(run.id, run.lease)
        timings["load_ms"] = (time.monotonic() - t0) * 1000
        try:
            # Off the event loop: a tenant's problem may list tens of thousands of teams, and
            # heartbeats, Realtime and other runs' announcements must keep their pace.
            problem = await asyncio.to_thread(Problem.model_validate, raw)
        except ValidationError as exc:
            reason = summarise_validation(exc)
            logger.error("the run's input is not a valid problem: {}", reason)
            return invalid_input(reason, [str(e.get("msg")) for e in exc.errors()])
        # The run's cap is the database's (time_limit_s, set at insert from the organisation's
        # limits); options may only ask for less, to the fraction of a second.
        limit = float(run.time_limit_s)
        if "time_limit_seconds" in problem.options.model_fields_set:
            limit = min(problem.options.time_limit_seconds, limit)
        logger.info(
            "solving {} lines x {} terms, {} teams, rule sets {} (limit {:.0f}s)",
            problem.n_job_lines, len(problem.terms), len(problem.teams),
            ",".join(problem.rule_sets) or "-", limit,
        )
        refusal = memory_refusal(problem, self.s.solver_memory_mb)
        if refusal is not None:
            # Refused before the solve starts, never killed mid-solve (issue 12).
            logger.error(refusal)
            return failed(refusal)
        lease.check("while loading")
        solve = self.solver.start(problem, limit)
        lease.attach(solve)
        # The next run's child loads while this one solves: in a burst every run but the
        # first starts solving at once.
        self.solver.prepare_next()
        self._announce(run, StatusEvent(run_id=run.id, status=RunStatus.GENERATING,
                                   phase=Phase.SOLVING))
        metrics.SOLVING.set(1)
        solve_started = time.monotonic()
        try:
            plan, stop = await self._supervise(run, solve, draining, lease)
        except SolverProcessError as exc:
            logger.error("the solver process failed: {}", exc)
            return failed(f"solver failed: {exc}")
        finally:
            metrics.SOLVING.set(0)
            metrics.SOLVE_SECONDS.observe(time.monotonic() - solve_started)
            timings["solve_wall_ms"] = (time.monotonic() - solve_started) * 1000
        timings["solver_ms"] = plan.solve_seconds * 1000
        if stop is StopReason.SHUTDOWN:
            logger.warning(
                "shutdown grace of {:.0f}s exceeded; run re-queued", self.s.shutdown_grace_s)
        elif stop is StopReason.CANCELLED:
            logger.info("cancelled by the user; the plan in place is unchanged")
        elif plan.status == "INFEASIBLE":
            for line in plan.explanation or ["no explanation found"]:
                logger.warning("infeasible: {}", line)
        result = decide(plan, stop, metadata_of(plan, worker_id=self.s.worker_id,
                                                attempt=run.attempts), limit)
        if result.error:
            logger.error(result.error)
        return result

    async def _conclude(
        self, run: ClaimedRun, result: Result, timings: dict[str, float]
    ) -> Outcome:
        """Write the result (fenced), then announce it as the attempt's last UI event."""
        if result.status is None:
            logger.warning("lease lost (the run was swept or re-queued); nothing written")
            await self._all_sent()
            return result.outcome
        snapshot = None
        if result.lines is not None:
            assert result.metadata is not None
            self._announce(run, StatusEvent(run_id=run.id, status=RunStatus.GENERATING,
                                       phase=Phase.WRITING))
            w0 = time.monotonic()
            snapshot = await self.store.commit_plan(run, result.lines, result.metadata)
            timings["commit_ms"] = (time.monotonic() - w0) * 1000
            meta = result.metadata
            logger.info(
                "plan written: {} lines, {} unfilled position(s), objective {}, {} ({} snapshot)",
                len(result.lines), sum(u.missing for u in meta.unfilled), meta.objective,
                meta.solver_status, snapshot or "no",
            )
        else:
            await self.store.finish(run, result.status, result.error, result.metadata)
        final: UiEvent
        if result.status is RunStatus.PENDING:
            final = StatusEvent(run_id=run.id, status=RunStatus.PENDING, phase=Phase.QUEUED)
        else:
            final = DoneEvent(run_id=run.id, status=result.status, error=result.error,
                              snapshot_id=snapshot, result=result.metadata)
        self._announce(run, final)
        await self._all_sent()
        return result.outcome

    async def _conclude_safely(
        self, run: ClaimedRun, result: Result, timings: dict[str, float]
    ) -> Outcome:
        """`_conclude` on a path that is already failing: a write error is logged, not raised
        (and nothing is announced, since the row did not change; the sweeper settles it)."""
        try:
            return await self._conclude(run, result, timings)
        except LeaseLost:
            logger.warning("could not mark the run {}: lease already lost", result.status)
            return Outcome.LEASE_LOST
        except Exception as exc:
            logger.error("could not mark the run {}: {}", result.status, exc)
            return result.outcome

    async def _supervise(
        self, run: ClaimedRun, solve: RunningSolve, draining: asyncio.Event, lease: Lease
    ) -> tuple[Plan, StopReason]:
        """Wait for the plan while streaming progress and honouring stops (the run's
        heartbeat stops or kills the solve through `lease`).

        Raises LeaseLost when the lease is gone.
        """
        throttle = ProgressThrottle(self.events, run.lease, self.s.progress_interval_s)
        shutdown_killed = False

        async def pump_progress() -> None:
            async for p in solve.progress():
                throttle.update(ProgressEvent.of(run.id, p))

        async def watch_shutdown() -> None:
            nonlocal shutdown_killed
            await draining.wait()
            logger.info("shutdown requested: letting the solve finish (grace {:.0f}s)",
                        self.s.shutdown_grace_s)
            await asyncio.sleep(self.s.shutdown_grace_s)
            if not lease.cancel_requested:
                shutdown_killed = True
                solve.kill()

        pump = asyncio.create_task(pump_progress())
        watcher = asyncio.create_task(watch_shutdown())
        ended = False
        try:
            try:
                plan = await solve.result()
                ended = True
            except SolverProcessError:
                ended = True
                lease.check("during the solve")
                if shutdown_killed:
                    return Plan(status="UNKNOWN"), StopReason.SHUTDOWN
                raise
        except asyncio.CancelledError:
            solve.kill()
            raise
        finally:
            watcher.cancel()
            if not ended:
                pump.cancel()
            # The progress stream ends with the solve: let it hand over the last figures.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(pump, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
            self._in_order(throttle.close)  # the last figures, without delaying the commit
        lease.check("during the solve")
        if lease.cancel_requested:
            return plan, StopReason.CANCELLED
        return plan, StopReason.SHUTDOWN if shutdown_killed else StopReason.FINISHED

