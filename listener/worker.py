"""One run, start to finish: load, solve in the child process, heartbeat, write back.

The database fences every write on the run's lease, so the rules here are about *what* to
write, never about whether it is safe:

* plan found                -> `commit_plan` (snapshot + replace + COMPLETED, one transaction)
* proven infeasible         -> INFEASIBLE, with the solver's explanation in `result_metadata`
* user asked to cancel      -> CANCELLED
* shutdown past the grace   -> back to PENDING, so another listener takes it
* lease lost (swept)        -> nothing at all; the run is someone else's now
* anything else             -> FAILED with a one-line error on the run and the traceback in
                               `planner_execution_logs`
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from loguru import logger
from pydantic import ValidationError

from listener import metrics
from listener.broadcast import Broadcaster, ProgressThrottle
from listener.db import ClaimedRun, EngineDB, LeaseLost
from listener.settings import ListenerSettings
from solver import Plan, Problem
from solver.process import SolveHandle, SolverProcessError, SpareChild, start_solve


class Outcome(StrEnum):
    COMPLETED = "COMPLETED"
    INFEASIBLE = "INFEASIBLE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REQUEUED = "REQUEUED"
    LEASE_LOST = "LEASE_LOST"


def adapt_problem(raw: dict[str, Any]) -> dict[str, Any]:
    """Bridge database rows to the solver's strict problem format.

    * an empty subspecialty means "the specialty itself" (the solver needs one to apply the
      25 % subspecialty rule), an empty site means none;
    * lines of the previous plan beyond the requested number are dropped: asking for fewer
      lines than the current plan has is a normal request, not an error.
    """
    out = dict(raw)
    if isinstance(out.get("teams"), list):
        teams: list[Any] = []
        for team in out["teams"]:
            if isinstance(team, dict):  # anything else is the model's to reject, readably
                team = dict(team)
                if not team.get("subspecialty"):
                    team["subspecialty"] = team.get("specialty") or ""
                if team.get("site") == "":
                    team["site"] = None
            teams.append(team)
        out["teams"] = teams
    prev = out.get("previous_plan")
    n = out.get("n_job_lines")
    if isinstance(prev, dict) and isinstance(n, int) and isinstance(prev.get("lines"), list):
        # Drop only well-formed lines beyond n; anything malformed is left for the model to
        # reject with a readable message (int() here used to raise on junk line numbers).
        lines = [ln for ln in prev["lines"]
                 if not (isinstance(ln, dict) and isinstance(ln.get("line"), int)
                         and ln["line"] > n)]
        out["previous_plan"] = {**prev, "lines": lines}
    if out.get("options") is None:
        out["options"] = {}
    return out


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


def plan_lines(problem: Problem, plan: Plan) -> list[dict[str, Any]]:
    """The plan in `commit_plan`'s shape, carrying the pins that were kept."""
    pins: dict[int, dict[str, str]] = {}
    if problem.previous_plan is not None and problem.options.keep_pinned:
        for prev in problem.previous_plan.lines:
            pins[prev.line] = {t: prev.rotations[t] for t in prev.pinned}
    lines = []
    for line in plan.lines:
        kept = pins.get(line.line, {})
        pinned = [t for t, team in kept.items() if line.rotations.get(t) == team]
        lines.append({"line": line.line, "rotations": line.rotations, "pinned": pinned})
    return lines


def plan_metadata(plan: Plan, run: ClaimedRun, worker_id: str) -> dict[str, Any]:
    return {
        "solver_status": plan.status,
        "objective": plan.objective,
        "best_bound": plan.best_bound,
        "gap": plan.gap,
        "solve_seconds": plan.solve_seconds,
        "solutions": plan.solutions,
        "unfilled": [u.model_dump() for u in plan.unfilled],
        "changed_cells": plan.changed_cells,
        "penalties": plan.penalties,
        "explanation": plan.explanation,
        "peak_memory_mb": plan.peak_memory_mb,
        "worker_id": worker_id,
        "attempt": run.attempts,
    }


@dataclass
class _Lease:
    """What the run's heartbeat has learnt, shared with the solve supervision."""

    lost: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    handle: SolveHandle | None = None  # the child to stop or kill, once there is one


class RunExecutor:
    """Executes claimed runs one at a time for the listener."""

    def __init__(self, db: EngineDB, broadcaster: Broadcaster, settings: ListenerSettings) -> None:
        self.db = db
        self.bc = broadcaster
        self.s = settings
        self._phases: asyncio.Task[None] | None = None  # last phase broadcast, in order
        self.spare = SpareChild() if settings.solver_spare else None
        if self.spare is not None:
            self.spare.refill()

    def _phase(self, run_id: Any, phase: str) -> None:
        """Announce a GENERATING phase without waiting for Realtime.

        These broadcasts sit between the claim and the first heartbeat (and between the last
        heartbeat and the commit). Awaiting them let a slow Realtime (up to 3 s per call)
        stretch the lease's unheartbeated window past a short sweeper TTL, so a live run
        was re-queued. Each phase task awaits the previous one, so events stay in order.
        """
        self._in_order(lambda: self.bc.status(run_id, "GENERATING", phase))

    def _in_order(self, make: Callable[[], Awaitable[Any]]) -> None:
        """Run a best-effort broadcast after the previous one, without waiting for it here."""
        prev = self._phases

        async def send() -> None:
            if prev is not None:
                with contextlib.suppress(Exception):
                    await prev
            await make()

        self._phases = asyncio.create_task(send())

    async def _phases_sent(self) -> None:
        if self._phases is not None:
            with contextlib.suppress(Exception):
                await self._phases

    def close(self) -> None:
        if self.spare is not None:
            self.spare.close()

    async def execute(
        self, run: ClaimedRun, draining: asyncio.Event, claim_s: float = 0.0
    ) -> Outcome:
        """Run to a final state. Never raises except CancelledError (after cleaning up)."""
        with logger.contextualize(planner_run_id=str(run.id),
                                  organization_id=str(run.organization_id)):
            started = time.monotonic()
            outcome = Outcome.FAILED
            timings: dict[str, float] = {"claim_ms": claim_s * 1000}
            try:
                outcome = await self._execute(run, draining, timings)
            except LeaseLost:
                logger.warning("lease lost (the run was swept or re-queued); nothing written")
                outcome = Outcome.LEASE_LOST
            except asyncio.CancelledError:
                logger.warning("listener stopping: handing the run back to the queue")
                await asyncio.shield(self._safe_finish(run, "PENDING", None, None))
                metrics.RUNS.labels(outcome=Outcome.REQUEUED.value).inc()
                raise
            except Exception as exc:
                logger.exception("run failed: {}", exc)
                error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                await self._safe_finish(run, "FAILED", f"internal error: {error}", None)
                outcome = Outcome.FAILED
            metrics.RUNS.labels(outcome=outcome.value).inc()
            await self._phases_sent()  # after the database write: "done" comes last
            if outcome is not Outcome.LEASE_LOST:
                status = "PENDING" if outcome is Outcome.REQUEUED else outcome.value
                await self.bc.status(run.id, status, "done")
            overhead_ms = sum(timings.get(k, 0.0) for k in ("claim_ms", "load_ms", "commit_ms"))
            metrics.RUN_OVERHEAD_SECONDS.observe(overhead_ms / 1000)
            logger.bind(**{k: round(v, 2) for k, v in timings.items()},
                        overhead_ms=round(overhead_ms, 2)).info(
                "run finished: {} in {:.2f}s", outcome.value, time.monotonic() - started)
            if self.spare is not None and not draining.is_set():
                self.spare.refill()  # a no-op unless the spare died
            return outcome

    async def _safe_finish(
        self, run: ClaimedRun, status: str, error: str | None, meta: dict[str, Any] | None
    ) -> None:
        try:
            await self.db.finish(run, status, error, meta)
        except LeaseLost:
            logger.warning("could not mark the run {}: lease already lost", status)
        except Exception as exc:
            logger.error("could not mark the run {}: {}", status, exc)

    async def _finish_with(
        self, run: ClaimedRun, status: str, error: str | None, meta: dict[str, Any] | None
    ) -> None:
        await self.db.finish(run, status, error, meta)
        await self.bc.send(run.id, "done", {"run_id": str(run.id), "status": status,
                                            "error": error, **(meta or {})})

    async def _heartbeat(self, run: ClaimedRun, lease: _Lease) -> None:
        """Keep the lease from the claim to the end of the run (load, solve and commit alike).

        A lost lease kills the solve (nothing will be written); a cancel request stops it.
        """
        while True:
            await asyncio.sleep(self.s.heartbeat_interval_s)
            try:
                beat = await self.db.heartbeat(run.id, run.lease)
            except Exception as exc:  # the sweeper's TTL covers a long outage
                logger.warning("heartbeat failed: {}", exc)
                continue
            if not beat.lease_held:
                lease.lost.set()
                if lease.handle is not None:
                    lease.handle.kill()
                return
            if beat.cancel_requested and not lease.cancel_requested:
                lease.cancel_requested = True
                if lease.handle is not None:
                    lease.handle.stop()

    async def _execute(
        self, run: ClaimedRun, draining: asyncio.Event, timings: dict[str, float]
    ) -> Outcome:
        """The run's steps, heartbeating throughout; `timings` says where the time went."""
        lease = _Lease()
        heartbeat = asyncio.create_task(self._heartbeat(run, lease))
        try:
            return await self._steps(run, draining, timings, lease)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat

    async def _steps(
        self, run: ClaimedRun, draining: asyncio.Event, timings: dict[str, float], lease: _Lease
    ) -> Outcome:
        logger.info("run claimed (attempt {}/{})", run.attempts, run.max_attempts)
        self._phase(run.id, "loading")
        t0 = time.monotonic()
        raw = await self.db.load_problem(run.id, run.lease)
        try:
            problem = Problem.model_validate(adapt_problem(raw))
        except ValidationError as exc:
            reason = summarise_validation(exc)
            logger.error("the run's input is not a valid problem: {}", reason)
            details = {"validation_errors": [str(e.get("msg")) for e in exc.errors()]}
            await self._finish_with(run, "FAILED", f"invalid input: {reason}", details)
            return Outcome.FAILED

        limit = min(problem.options.time_limit_seconds, self.s.solver_time_limit_s)
        logger.info(
            "solving {} lines x {} terms, {} teams, rule sets {} (limit {:.0f}s)",
            problem.n_job_lines, len(problem.terms), len(problem.teams),
            ",".join(problem.rule_sets) or "-", limit,
        )
        timings["load_ms"] = (time.monotonic() - t0) * 1000
        if lease.lost.is_set():
            raise LeaseLost("lease lost while loading")
        handle = start_solve(problem, memory_limit_mb=self.s.solver_memory_mb,
                             time_limit_s=limit, num_workers=self.s.solver_workers,
                             spare=self.spare)
        lease.handle = handle
        if lease.cancel_requested:
            handle.stop()
        if self.spare is not None:
            # The next run's child loads while this one solves (about 1.3 s of one core):
            # in a burst every run but the first starts solving at once.
            self.spare.refill()
        self._phase(run.id, "solving")
        metrics.SOLVING.set(1)
        solve_started = time.monotonic()
        try:
            plan, stopped_by = await self._supervise(run, handle, draining, lease)
        except SolverProcessError as exc:
            logger.error("the solver process failed: {}", exc)
            await self._finish_with(run, "FAILED", f"solver failed: {exc}", None)
            return Outcome.FAILED
        finally:
            metrics.SOLVING.set(0)
            metrics.SOLVE_SECONDS.observe(time.monotonic() - solve_started)
            timings["solve_wall_ms"] = (time.monotonic() - solve_started) * 1000

        if stopped_by == "cancel":
            logger.info("cancelled by the user; the plan in place is unchanged")
            await self._finish_with(run, "CANCELLED", None, None)
            return Outcome.CANCELLED
        if stopped_by == "shutdown":
            logger.warning(
                "shutdown grace of {:.0f}s exceeded; run re-queued", self.s.shutdown_grace_s
            )
            await self.db.finish(run, "PENDING", None, None)
            return Outcome.REQUEUED

        self._phase(run.id, "writing")
        meta = plan_metadata(plan, run, self.s.worker_id)
        w0 = time.monotonic()
        timings["solver_ms"] = plan.solve_seconds * 1000
        if plan.status in ("OPTIMAL", "FEASIBLE"):
            snapshot = await self.db.commit_plan(run, plan_lines(problem, plan), meta)
            timings["commit_ms"] = (time.monotonic() - w0) * 1000
            logger.info(
                "plan written: {} lines, {} unfilled position(s), objective {}, {} ({} snapshot)",
                len(plan.lines), sum(u.missing for u in plan.unfilled), plan.objective,
                plan.status, snapshot or "no",
            )
            await self.bc.send(run.id, "done", {"run_id": str(run.id), "status": "COMPLETED",
                                                "snapshot_id": str(snapshot) if snapshot else None,
                                                **meta})
            return Outcome.COMPLETED
        if plan.status == "INFEASIBLE":
            for line in plan.explanation or ["no explanation found"]:
                logger.warning("infeasible: {}", line)
            await self._finish_with(run, "INFEASIBLE", None, meta)
            return Outcome.INFEASIBLE
        reason = (
            f"no feasible plan found within the {limit:.0f}s time limit"
            if plan.status == "UNKNOWN" else f"solver returned {plan.status}"
        )
        logger.error(reason)
        await self._finish_with(run, "FAILED", reason, meta)
        return Outcome.FAILED

    async def _supervise(
        self, run: ClaimedRun, handle: SolveHandle, draining: asyncio.Event, lease: _Lease
    ) -> tuple[Plan, str | None]:
        """Wait for the plan while streaming progress and honouring stops (the run's
        heartbeat, in `_heartbeat`, stops or kills the child through `lease`).

        Returns the plan and what stopped the search early (None, "cancel" or "shutdown").
        Raises LeaseLost when the lease is gone.
        """
        throttle = ProgressThrottle(self.bc, run.id, self.s.progress_interval_s)
        shutdown_killed = False

        async def pump_progress() -> None:
            async for p in handle.progress():
                throttle.update({"run_id": str(run.id), **p.model_dump()})

        async def watch_shutdown() -> None:
            nonlocal shutdown_killed
            await draining.wait()
            logger.info("shutdown requested: letting the solve finish (grace {:.0f}s)",
                        self.s.shutdown_grace_s)
            await asyncio.sleep(self.s.shutdown_grace_s)
            if not lease.cancel_requested:
                shutdown_killed = True
                handle.kill()

        helpers = [asyncio.create_task(f()) for f in (pump_progress, watch_shutdown)]
        try:
            try:
                plan = await handle.result()
            except SolverProcessError:
                if lease.lost.is_set():
                    raise LeaseLost("lease lost during the solve") from None
                if shutdown_killed:
                    return Plan(status="UNKNOWN"), "shutdown"
                raise
        except asyncio.CancelledError:
            handle.kill()
            raise
        finally:
            for t in helpers:
                t.cancel()
            for t in helpers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            self._in_order(throttle.close)  # the last figures, without delaying the commit
        if lease.lost.is_set():
            raise LeaseLost("lease lost during the solve")
        if lease.cancel_requested:
            return plan, "cancel"
        return plan, "shutdown" if shutdown_killed else None
