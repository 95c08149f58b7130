"""Run a solve in a child process: memory cap, wall-time limit, cancellation, streamed progress.

Why a child: CP-SAT is native code. A bad model, a huge instance or a bug can exhaust memory or
crash the process; the listener (an asyncio program) must survive all of that and report a
clean error.

The child is a fresh interpreter (`python -m solver.child`, fork+exec like multiprocessing's
"spawn", so a threaded parent is never forked), started with `asyncio.create_subprocess_exec`.
We do not use multiprocessing itself because spawn re-imports the caller's `__main__`, which
breaks any unguarded script or entry point that calls `start_solve`. The child caps its own
address space with RLIMIT_AS, dies with its parent (PR_SET_PDEATHSIG plus a parent-pid
watchdog), and turns SIGTERM into `solver.stop_search()` so the caller gets the best plan found
so far.

Contract (typed both ways, `solver.protocol`): the parent writes one `SolveRequest` JSON line
on the child's stdin (problem, memory_limit_mb, time_limit_s, num_workers, parent_pid); the
child answers with `ChildMessage` JSON lines on its stdout (its own prints and logs go to a
stderr file), each tagged by `kind`:
  progress   any number, throttled by the solver
  plan       exactly once on success
  oom        the child knows it ran out of memory
  error      the solve raised
A line that is not one of these is logged and skipped. The parent classifies a child that exits
without a plan: out of memory (message, MemoryError, std::bad_alloc on stderr, or SIGKILL it did
not send) -> SolverOutOfMemory; anything else -> SolverCrashed. Both carry a one-line message
with the exit code or signal. Past the solve's time limit plus STOP_GRACE_S the parent stops the
child (SIGTERM), and KILL_GRACE_S later kills it (SIGKILL).

asyncio: each child has exactly one supervising task (spawn or take the spare, write the
request, read and dispatch lines, enforce the deadline, reap, classify). `start_solve` is a
plain function that needs a running event loop and returns at once; `progress()` and
`result()` may be awaited concurrently by any number of tasks of that loop, and `stop()` /
`kill()` are plain calls that any task may make at any time (before the child exists they are
remembered and applied as soon as it does). Synchronous callers use `solve_in_child`, which
wraps the whole solve in `asyncio.run`. Cancelling the supervising task (the loop shutting
down under a running solve) kills the child, so nothing is left behind.

SpareChild pre-starts a child *within the running loop*: `refill()` schedules the spawn as a
task and returns at once (`await spare.ready()` waits for it); `start_solve(..., spare=)` takes
the spare, waiting for its spawn if it is still under way. A spare belongs to the loop that
refilled it; handed to another loop it is discarded and a fresh child is spawned.

Note on PR_SET_PDEATHSIG: Linux fires it when the *thread* that started the child exits, and
asyncio forks in the thread that runs the event loop. Run the loop in a long-lived thread (the
main thread is fine); the watchdog still catches the parent process dying. On Python 3.11,
asyncio's default child watcher waits for each child's exit in a thread of its own; that
thread only calls waitpid and does not start processes, so it does not affect the death signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from loguru import logger
from pydantic import ValidationError

from solver.estimate import memory_refusal
from solver.problem import Plan, Problem, Progress
from solver.protocol import (
    ErrorMessage,
    OutOfMemoryMessage,
    PlanMessage,
    ProgressMessage,
    SolveRequest,
    decode,
)

#: After the solve's own time limit: time for the explanation pass and shutdown before the
#: parent stops (SIGTERM) and then kills (SIGKILL) the child.
STOP_GRACE_S = 45.0
KILL_GRACE_S = 10.0
#: Longest protocol line read from the child (a plan of thousands of lines is a few MiB).
LINE_LIMIT_BYTES = 64 * 1024 * 1024
#: The directory holding the `solver` package: the child imports the same code as the parent.
_ROOT = str(Path(__file__).resolve().parent.parent)
_OOM_MARKERS = ("bad_alloc", "MemoryError", "Cannot allocate memory", "out of memory",
                "failed to map segment", "Resource temporarily unavailable",
                # a thread's stack is an mmap too: under RLIMIT_AS, Python reports this
                "can't start new thread")


class SolverProcessError(RuntimeError):
    """The child process ended without a plan."""


class SolverOutOfMemory(SolverProcessError):
    """The child hit its memory cap (or the system's)."""


class RequestTooLarge(SolverProcessError):
    """Refused before starting: the estimate (`solver.estimate`) exceeds the memory cap."""


class SolverCrashed(SolverProcessError):
    """The child died (signal, non-zero exit, exception) for a reason other than memory."""


# ---------------------------------------------------------------------------- children


def _child_argv() -> list[str]:
    """The child's command line; the parent pid lets it die with us from its first instant."""
    return [sys.executable, "-m", "solver.child", str(os.getpid())]


class _Child:
    """A started child interpreter: its process and the file its stderr goes to."""

    def __init__(self, process: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    def signal(self, sig: signal.Signals) -> None:
        """Signal the child unless it is known to have exited.

        `os.kill` rather than `Process.send_signal`: the latter polls with waitpid from this
        thread, racing the child watcher's own waitpid, and the loser reports exit code 255
        instead of the real signal, which would break the classification.
        """
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stderr_tail(self) -> str:
        """The end of the child's stderr; the file is removed."""
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""
        finally:
            self.remove_stderr()

    def remove_stderr(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.stderr_path)

    async def reap(self, grace_s: float) -> None:
        """Wait for the exit; SIGKILL after `grace_s`."""
        try:
            await asyncio.wait_for(self.process.wait(), grace_s)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.process.wait()

    async def close_unused(self) -> None:
        """End a child that never got a request: it exits on stdin EOF."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
            await self.reap(5.0)
        except asyncio.CancelledError:
            self.signal(signal.SIGKILL)
            raise
        finally:
            self.remove_stderr()


async def _spawn() -> _Child:
    """A fresh child interpreter, importing OR-Tools, then waiting for its request on stdin."""
    fd, stderr_name = tempfile.mkstemp(prefix="planner-solver-", suffix=".log")
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        process = await asyncio.create_subprocess_exec(
            *_child_argv(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=fd,
            env=env,
            limit=LINE_LIMIT_BYTES,
        )
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(stderr_name)
        raise
    finally:
        os.close(fd)
    return _Child(process, Path(stderr_name))


def _spawned(task: asyncio.Task[_Child]) -> _Child | None:
    """The child a finished spawn task produced; None while it runs or when it failed."""
    if not task.done() or task.cancelled() or task.exception() is not None:
        return None
    return task.result()


def _describe_exit(code: int | None) -> str:
    how = f"exit code {code}"
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            how = f"signal {signal.Signals(-code).name} (exit code {code})"
    return how


# -------------------------------------------------------------------------------- parent

#: Every running supervising task, so a handle its caller dropped still finishes its child.
_SUPERVISING: set[asyncio.Task[None]] = set()


class SolveHandle:
    """A running child solve, supervised by one task of the loop that started it.

    `progress()` and `result()` can be awaited concurrently from several tasks; `stop()` and
    `kill()` are plain calls (the listener's heartbeat makes them from another task).
    """

    def __init__(self, request: SolveRequest, spare: asyncio.Task[_Child] | None) -> None:
        self._request = request
        # A spare that is already running is known at once, so `pid` is set when we return.
        self._child: _Child | None = _spawned(spare) if spare is not None else None
        self._progress: list[Progress] = []
        self._changed = asyncio.Condition()
        self._finished = asyncio.Event()
        self._plan: Plan | None = None
        self._error: SolverProcessError | None = None
        self._killed = False
        self._stop_requested = False
        self._task = asyncio.get_running_loop().create_task(self._supervise(spare),
                                                            name="solver-child")
        _SUPERVISING.add(self._task)  # the loop keeps only weak references to tasks
        self._task.add_done_callback(_SUPERVISING.discard)

    @property
    def pid(self) -> int | None:
        """The child's pid; None until it has been spawned (a taken spare has one at once)."""
        return self._child.pid if self._child is not None else None

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    # -- control -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the child to stop searching and return the best plan so far (SIGTERM)."""
        self._stop_requested = True
        if self._child is not None:
            self._child.signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL, for when `stop()` is not honoured. `result()` then raises SolverCrashed."""
        self._killed = True
        if self._child is not None:
            self._child.signal(signal.SIGKILL)

    # -- the supervising task --------------------------------------------------------------
    async def _obtain(self, spare: asyncio.Task[_Child] | None) -> _Child:
        if spare is not None:
            try:
                child = await spare
            except Exception as exc:
                logger.warning("the spare solver child could not start ({}); spawning one", exc)
            else:
                if child.alive:
                    return child
                logger.warning("the spare solver child {} had exited ({}); spawning one",
                               child.pid, _describe_exit(child.process.returncode))
                child.remove_stderr()
        return await _spawn()

    async def _supervise(self, spare: asyncio.Task[_Child] | None) -> None:
        child: _Child | None = None
        try:
            child = self._child = await self._obtain(spare)
            if self._killed:
                child.signal(signal.SIGKILL)
            elif self._stop_requested:
                child.signal(signal.SIGTERM)
            logger.info("solver child {} started (memory cap {} MiB, time limit {}s)",
                        child.pid, self._request.memory_limit_mb, self._request.time_limit_s)
            plan, oom, error = await self._exchange(child)
            await child.reap(KILL_GRACE_S)
            self._classify(child, plan, oom, error)
        except asyncio.CancelledError:
            # The loop is going away under a running solve: leave no child behind.
            if child is not None:
                child.signal(signal.SIGKILL)
                child.remove_stderr()
                with contextlib.suppress(Exception):  # reap it, unless cancelled again
                    await asyncio.wait_for(child.process.wait(), KILL_GRACE_S)
            self._error = SolverCrashed("solver supervision cancelled; the child was killed")
            raise
        except Exception as exc:  # spawn failed (no interpreter, no fds, ...)
            logger.error("could not run the solver process: {}", exc)
            if child is not None:
                child.signal(signal.SIGKILL)
                child.remove_stderr()
            self._error = SolverCrashed(f"could not run the solver process: {exc}")
        finally:
            self._finished.set()
            await self._wake()

    async def _exchange(self, child: _Child) -> tuple[Plan | None, str | None, str | None]:
        """Send the request, then read messages until EOF, stopping/killing past the deadline.

        Returns (plan, oom message, error message) as received.
        """
        assert child.process.stdout is not None
        loop = asyncio.get_running_loop()
        deadline: float | None = loop.time() + self._request.time_limit_s + STOP_GRACE_S
        stopped = written = False
        plan: Plan | None = None
        oom: str | None = None
        error: str | None = None
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    if not written:
                        written = True
                        await self._write_request(child)
                    raw = await child.process.stdout.readline()
            except TimeoutError:
                if not stopped:
                    logger.warning("solver child {} over its wall-time limit: stopping",
                                   child.pid)
                    self.stop()
                    stopped, deadline = True, loop.time() + KILL_GRACE_S
                else:
                    logger.error("solver child {} ignored SIGTERM: killing", child.pid)
                    self.kill()
                    deadline = None
                continue
            except ValueError:  # a line over LINE_LIMIT_BYTES (the reader skipped it)
                logger.warning("solver child {}: message over {} bytes skipped",
                               child.pid, LINE_LIMIT_BYTES)
                continue
            if not raw:
                return plan, oom, error
            try:
                message = decode(raw)
            except ValidationError:
                logger.warning("solver child {}: bad message {!r}", child.pid, raw[:200])
                continue
            match message:
                case ProgressMessage(progress=progress):
                    self._progress.append(progress)
                    await self._wake()
                case PlanMessage(plan=received):
                    plan = received
                case OutOfMemoryMessage(message=text):
                    oom = text
                case ErrorMessage(message=text):
                    error = text

    async def _write_request(self, child: _Child) -> None:
        stdin = child.process.stdin
        assert stdin is not None
        try:
            stdin.write(self._request.model_dump_json().encode() + b"\n")
            await stdin.drain()
            stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child died at once; its exit is classified after EOF

    def _classify(self, child: _Child, plan: Plan | None, oom: str | None,
                  error: str | None) -> None:
        code = child.process.returncode
        tail = child.stderr_tail()
        how = _describe_exit(code)
        if plan is None and self._stop_requested and code == -signal.SIGTERM and not self._killed:
            # Stopped before the child could install its handler: nothing was found yet.
            plan = Plan(status="UNKNOWN")
        if plan is not None:
            self._plan = plan
            return
        kind: type[SolverProcessError]
        if oom is not None:
            kind, text = SolverOutOfMemory, oom
        elif error is not None and any(m in error for m in _OOM_MARKERS):
            kind, text = SolverOutOfMemory, f"solver ran out of memory ({error})"
        elif error is not None:
            kind, text = SolverCrashed, f"solver failed: {error}"
        elif self._killed:
            kind, text = SolverCrashed, "solver process was killed on request"
        elif any(m in tail for m in _OOM_MARKERS) or code == -signal.SIGKILL:
            kind = SolverOutOfMemory
            text = f"solver ran out of memory (limit {self._request.memory_limit_mb} MiB)"
        else:
            kind, text = SolverCrashed, "solver process died without a plan"
        # One line, whatever the child said (an exception message can span several).
        self._error = kind(" ".join(f"{text}; {how}".split()))
        last = tail.strip().splitlines()[-1:] if tail.strip() else []
        logger.error("solver child {}: {}{}", child.pid, self._error,
                     f" (stderr: {last[0][:200]})" if last else "")

    # -- waiting -------------------------------------------------------------------------
    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _news_since(self, seen: int) -> bool:
        return len(self._progress) > seen or self._finished.is_set()

    async def progress(self) -> AsyncIterator[Progress]:
        """Progress messages as they arrive (from the first); ends when the child finishes."""
        seen = 0
        while True:
            async with self._changed:
                await self._changed.wait_for(functools.partial(self._news_since, seen))
                batch = self._progress[seen:]
                finished = self._finished.is_set()
            for item in batch:
                yield item
            seen += len(batch)
            if finished and seen >= len(self._progress):
                return

    async def result(self) -> Plan:
        """The final plan; raises SolverOutOfMemory / SolverCrashed if the child died.

        Cancelling this await does not affect the solve (the supervising task carries on).
        """
        await self._finished.wait()
        if self._error is not None:
            raise self._error
        assert self._plan is not None
        return self._plan


# ---------------------------------------------------------------------------- the spare


class SpareChild:
    """One solver child started ahead of time, its imports done, waiting for a problem.

    A fresh interpreter needs about 1.3 s to load OR-Tools; a long-running caller (the
    listener) keeps a spare so a run starts solving at once. `refill()` starts one in the
    background of the running loop (a no-op while a live spare is waiting or starting);
    `start_solve(..., spare=)` takes it (and none is started in its place: the listener
    refills as soon as a solve has started, trading ~1.3 s of one core during that solve for
    no start-up wait on the next run). `close()` ends an unused spare (it exits on stdin EOF);
    `await wait_closed()` waits until it has.
    """

    def __init__(self) -> None:
        self._task: asyncio.Task[_Child] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def _started(self) -> _Child | None:
        return _spawned(self._task) if self._task is not None else None

    @property
    def pid(self) -> int | None:
        """The waiting spare's pid, once it has been spawned and while it is alive."""
        child = self._started()
        return child.pid if child is not None and child.alive else None

    def _usable(self, loop: asyncio.AbstractEventLoop) -> bool:
        task = self._task
        if task is None or task.get_loop() is not loop:
            return False
        if not task.done():
            return True
        child = self._started()
        return child is not None and child.alive

    def refill(self) -> None:
        """Make sure a spare is waiting or starting (needs a running loop; returns at once)."""
        loop = asyncio.get_running_loop()
        if self._usable(loop):
            return
        self.close()
        self._task = loop.create_task(_spawn(), name="solver-spare")

    async def ready(self) -> int | None:
        """Wait for the spare's spawn; its pid, or None when there is none or it failed."""
        if self._task is None:
            return None
        with contextlib.suppress(Exception):
            await asyncio.shield(self._task)
        return self.pid

    def take(self) -> asyncio.Task[_Child] | None:
        """Hand the spare (its spawn task) over to a solve; None when there is no usable one."""
        loop = asyncio.get_running_loop()
        if not self._usable(loop):
            self.close()
            return None
        task, self._task = self._task, None
        return task

    def close(self) -> None:
        """End the spare, if any, in the background (`wait_closed()` to wait for it)."""
        task, self._task = self._task, None
        if task is None:
            return
        loop = task.get_loop()
        if loop.is_closed():  # its loop is gone: nothing can read its pipes any more
            child = _spawned(task)
            if child is not None:
                child.signal(signal.SIGKILL)
                child.remove_stderr()
            return

        async def end() -> None:
            try:
                child = await task
            except Exception:
                return
            await child.close_unused()

        closing = loop.create_task(end(), name="solver-spare-close")
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def wait_closed(self) -> None:
        """Wait until every closed spare has exited and been reaped."""
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


# ---------------------------------------------------------------------------- entry points


def start_solve(
    problem: Problem,
    *,
    memory_limit_mb: int = 2048,
    time_limit_s: float | None = None,
    num_workers: int | None = None,
    spare: SpareChild | None = None,
    check_size: bool = True,
) -> SolveHandle:
    """Start solving `problem` in a child process and return its handle at once.

    Raises RequestTooLarge at once, before any child runs, when the request's memory estimate
    exceeds `memory_limit_mb` (never killed mid-solve instead); `check_size=False` skips the
    estimate (tests of the child's own out-of-memory handling, the safety net). Needs a
    running event loop (the handle's supervising task runs on it); from synchronous code use
    `solve_in_child`. With `spare`, the pre-started child is used (and none is
    started in its place: the caller refills when convenient).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError("start_solve needs a running event loop; from synchronous code "
                           "call solver.process.solve_in_child(...)") from None
    refusal = memory_refusal(problem, memory_limit_mb) if check_size else None
    if refusal is not None:
        raise RequestTooLarge(refusal)
    request = SolveRequest(
        problem=problem,
        memory_limit_mb=memory_limit_mb,
        time_limit_s=time_limit_s if time_limit_s is not None
        else problem.options.time_limit_seconds,
        num_workers=num_workers,
        parent_pid=os.getpid(),
    )
    return SolveHandle(request, spare.take() if spare is not None else None)


def solve_in_child(
    problem: Problem,
    *,
    memory_limit_mb: int = 2048,
    time_limit_s: float | None = None,
    num_workers: int | None = None,
) -> Plan:
    """Blocking variant for scripts: one child solve in its own event loop (`asyncio.run`).

    Raises SolverOutOfMemory / SolverCrashed like `SolveHandle.result()`.
    """

    async def run() -> Plan:
        handle = start_solve(problem, memory_limit_mb=memory_limit_mb,
                             time_limit_s=time_limit_s, num_workers=num_workers)
        return await handle.result()

    return asyncio.run(run())
