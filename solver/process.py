"""Run a solve in a child process: memory cap, wall-time limit, cancellation, streamed progress.

Why a child: CP-SAT is native code. A bad model, a huge instance or a bug can exhaust memory or
crash the process; the listener (an asyncio program with threads) must survive all of that and
report a clean error.

The child is a fresh interpreter (`python -m solver.child`, fork+exec like multiprocessing's
"spawn", so a threaded parent is never forked). We do not use multiprocessing itself because
spawn re-imports the caller's `__main__`, which breaks any unguarded script or entry point that
calls `start_solve`. The child caps its own address space with RLIMIT_AS, dies with its parent
(PR_SET_PDEATHSIG plus a parent-pid watchdog), and turns SIGTERM into `solver.stop_search()` so
the caller gets the best plan found so far.

Contract: the parent writes one JSON object on the child's stdin
({"problem", "memory_limit_mb", "num_workers", "parent_pid"}); the child answers with JSON lines
on its stdout (its own prints and logs go to a stderr file), each `[kind, payload]`:
  ["progress", Progress dict]  any number, throttled by the solver
  ["plan", Plan dict]          exactly once on success
  ["oom", str]                 the child knows it ran out of memory
  ["error", str]               the solve raised
The parent classifies a child that exits without a plan: out of memory (message, MemoryError,
std::bad_alloc on stderr, or SIGKILL it did not send) -> SolverOutOfMemory; anything else ->
SolverCrashed. Both carry a one-line message with the exit code or signal.

Note on PR_SET_PDEATHSIG: Linux fires it when the *thread* that started the child exits. Call
`start_solve` from a long-lived thread (the event-loop thread is fine); the watchdog still
catches the parent process dying.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

from loguru import logger

from solver.problem import Plan, Problem, Progress

#: After the solve's own time limit: time for the explanation pass and shutdown before the
#: parent stops (SIGTERM) and then kills (SIGKILL) the child.
STOP_GRACE_S = 45.0
KILL_GRACE_S = 10.0
_OOM_MARKERS = ("bad_alloc", "MemoryError", "Cannot allocate memory", "out of memory",
                "failed to map segment", "Resource temporarily unavailable")


class SolverProcessError(RuntimeError):
    """The child process ended without a plan."""


class SolverOutOfMemory(SolverProcessError):
    """The child hit its memory cap (or the system's)."""


class SolverCrashed(SolverProcessError):
    """The child died (signal, non-zero exit, exception) for a reason other than memory."""


# -------------------------------------------------------------------------------- parent


class SolveHandle:
    """A running child solve. Thread-safe; the async methods never block the event loop.

    A reader thread drains the pipe; async waiters are woken with `call_soon_threadsafe`, so
    `progress()` and `result()` can be awaited concurrently from different tasks (and loops).
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        stderr_path: str,
        memory_limit_mb: int,
        deadline_s: float,
    ) -> None:
        self._process = process
        self._stderr_path = stderr_path
        self._memory_limit_mb = memory_limit_mb
        self._deadline = time.monotonic() + deadline_s
        self._lock = threading.Lock()
        self._progress: list[Progress] = []
        self._plan: Plan | None = None
        self._error: SolverProcessError | None = None
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._killed = False
        self._stop_requested = False
        self._lines: list[bytes] = []
        self._eof = threading.Event()
        assert process.stdout is not None
        self._pump = threading.Thread(target=self._pump_lines, args=(process.stdout,),
                                      name=f"solver-pipe-{self.pid}", daemon=True)
        self._pump.start()
        self._reader = threading.Thread(target=self._read, name=f"solver-{self.pid}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # -- control -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the child to stop searching and return the best plan so far (SIGTERM)."""
        self._stop_requested = True
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, for when `stop()` is not honoured. `result()` then raises SolverCrashed."""
        self._killed = True
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    # -- reader threads ------------------------------------------------------------------
    def _pump_lines(self, pipe: IO[bytes]) -> None:
        """Blocking reads of the child's stdout, handed over line by line."""
        try:
            for raw in pipe:
                with self._lock:
                    self._lines.append(raw)
        finally:
            self._eof.set()

    def _read(self) -> None:
        """Dispatch messages, enforce the wall-time deadline, classify the ending."""
        plan: Plan | None = None
        oom: str | None = None
        error: str | None = None
        stopped_at: float | None = None
        try:
            while True:
                now = time.monotonic()
                if now > self._deadline and stopped_at is None:
                    logger.warning("solver child {} over its wall-time limit: stopping", self.pid)
                    self.stop()
                    stopped_at = now
                elif stopped_at is not None and now > stopped_at + KILL_GRACE_S:
                    logger.error("solver child {} ignored SIGTERM: killing", self.pid)
                    self.kill()
                    stopped_at = float("inf")
                eof = self._eof.wait(0.05)
                with self._lock:
                    batch, self._lines = self._lines, []
                for raw in batch:
                    try:
                        kind, payload = json.loads(raw)
                    except ValueError:
                        logger.warning("solver child {}: bad message {!r}", self.pid, raw[:200])
                        continue
                    if kind == "progress":
                        with self._lock:
                            self._progress.append(Progress.model_validate(payload))
                        self._notify()
                    elif kind == "plan":
                        plan = Plan.model_validate(payload)
                    elif kind == "oom":
                        oom = str(payload)
                    elif kind == "error":
                        error = str(payload)
                if eof and not batch:
                    with self._lock:
                        if not self._lines:
                            break
        finally:
            try:
                self._process.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._finish(plan, oom, error)

    def _stderr_tail(self) -> str:
        try:
            with open(self._stderr_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._stderr_path)

    def _finish(self, plan: Plan | None, oom: str | None, error: str | None) -> None:
        code = self._process.returncode
        tail = self._stderr_tail()
        how = f"exit code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = f"signal {signal.Signals(-code).name} (exit code {code})"
        err: SolverProcessError | None = None
        if plan is None and self._stop_requested and code == -signal.SIGTERM and not self._killed:
            # Stopped before the child could install its handler: nothing was found yet.
            plan = Plan(status="UNKNOWN")
        if plan is None:
            if oom is not None:
                err = SolverOutOfMemory(f"{oom}; {how}")
            elif error is not None and any(m in error for m in _OOM_MARKERS):
                err = SolverOutOfMemory(f"solver ran out of memory ({error}); {how}")
            elif error is not None:
                err = SolverCrashed(f"solver failed: {error}; {how}")
            elif self._killed:
                err = SolverCrashed(f"solver process was killed on request; {how}")
            elif any(m in tail for m in _OOM_MARKERS) or code == -signal.SIGKILL:
                err = SolverOutOfMemory(
                    f"solver ran out of memory (limit {self._memory_limit_mb} MiB); {how}")
            else:
                err = SolverCrashed(f"solver process died without a plan; {how}")
            last = tail.strip().splitlines()[-1:] if tail.strip() else []
            logger.error("solver child {}: {}{}", self.pid, err,
                         f" (stderr: {last[0][:200]})" if last else "")
        with self._lock:
            self._plan, self._error = plan, err
            self._done.set()
        self._notify()

    # -- waiting -------------------------------------------------------------------------
    def _notify(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(_resolve, fut)

    async def _wait_until(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if ready():
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, fut))
            await fut

    async def progress(self) -> AsyncIterator[Progress]:
        """Progress messages as they arrive; ends when the child finishes."""
        seen = 0
        while True:
            await self._wait_until(
                lambda n=seen: len(self._progress) > n or self._done.is_set()  # type: ignore[misc]
            )
            with self._lock:
                batch = self._progress[seen:]
                finished = self._done.is_set()
            for item in batch:
                yield item
            seen += len(batch)
            if finished and seen >= len(self._progress):
                return

    async def result(self) -> Plan:
        """The final plan; raises SolverOutOfMemory / SolverCrashed if the child died."""
        await self._wait_until(self._done.is_set)
        return self._outcome()

    def wait(self, timeout: float | None = None) -> Plan:
        """Blocking variant of `result()` (for the CLI and scripts)."""
        if not self._done.wait(timeout):
            raise TimeoutError("solver still running")
        return self._outcome()

    def _outcome(self) -> Plan:
        if self._error is not None:
            raise self._error
        assert self._plan is not None
        return self._plan


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _spawn() -> tuple[subprocess.Popen[bytes], str]:
    """A fresh child interpreter, waiting for its request on stdin."""
    fd, stderr_path = tempfile.mkstemp(prefix="planner-solver-", suffix=".log")
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "solver.child", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=fd,
            env=env,
            close_fds=True,
            start_new_session=False,
        )
    finally:
        os.close(fd)
    return process, stderr_path


class SpareChild:
    """One solver child started ahead of time, its imports done, waiting for a problem.

    A fresh interpreter needs about 1.3 s to load OR-Tools; a long-running caller (the
    listener) keeps a spare so a run starts solving at once. `take()` hands the spare over
    (or spawns one if there is none or it died) and `refill()` starts the next (the listener
    refills as soon as a solve has started, trading ~1.3 s of one core during that solve for
    no start-up wait on the next run). `close()` ends an unused spare (it exits on stdin EOF).
    """

    def __init__(self) -> None:
        self._spare: tuple[subprocess.Popen[bytes], str] | None = None

    @property
    def pid(self) -> int | None:
        """The waiting spare's pid, if there is one."""
        return self._spare[0].pid if self._spare is not None else None

    def refill(self) -> None:
        if self._spare is None or self._spare[0].poll() is not None:
            self._discard()
            self._spare = _spawn()

    def take(self) -> tuple[subprocess.Popen[bytes], str]:
        spare, self._spare = self._spare, None
        if spare is not None and spare[0].poll() is None:
            return spare
        if spare is not None:
            _cleanup(*spare)
        return _spawn()

    def _discard(self) -> None:
        if self._spare is not None:
            _cleanup(*self._spare)
            self._spare = None

    def close(self) -> None:
        self._discard()


def _cleanup(process: subprocess.Popen[bytes], stderr_path: str) -> None:
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    with contextlib.suppress(OSError):
        os.unlink(stderr_path)


def start_solve(
    problem: Problem,
    *,
    memory_limit_mb: int = 2048,
    time_limit_s: float | None = None,
    num_workers: int | None = None,
    spare: SpareChild | None = None,
) -> SolveHandle:
    """Start solving `problem` in a child process and return its handle at once.

    With `spare`, the pre-started child is used (and none is started in its place: the
    caller refills when convenient).
    """
    if time_limit_s is not None:
        problem = problem.model_copy(
            update={"options": problem.options.model_copy(
                update={"time_limit_seconds": time_limit_s})}
        )
    limit = problem.options.time_limit_seconds
    process, stderr_path = spare.take() if spare is not None else _spawn()
    request = {
        "problem": problem.model_dump(mode="json"),
        "memory_limit_mb": memory_limit_mb,
        "num_workers": num_workers,
        "parent_pid": os.getpid(),
    }
    assert process.stdin is not None
    try:
        process.stdin.write(json.dumps(request).encode() + b"\n")
        process.stdin.close()
    except BrokenPipeError:
        pass  # the child died at once; the reader reports it
    logger.info("solver child {} started (memory cap {} MiB, time limit {}s)",
                process.pid, memory_limit_mb, limit)
    return SolveHandle(process, stderr_path, memory_limit_mb, limit + STOP_GRACE_S)
