"""Entry point of the solver child process (`python -m solver.child`); see `solver.process`.

Kept out of `solver/__init__` on purpose: running it with `-m` must not find it imported.
The messages both ways are the models of `solver.protocol`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_M_ARENA_MAX = -8


def vm_size_mb() -> float:
    """Current address-space size (what RLIMIT_AS limits)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _die_with_parent(parent_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Each thread arena reserves 64 MiB of address space, which RLIMIT_AS counts.
        libc.mallopt(_M_ARENA_MAX, 2)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def main() -> None:
    # First thing: a stop that arrives while we are still importing must not kill us.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _sig, _frame: stop.set())
    # Ctrl-C in a terminal reaches the whole process group; the parent decides (it sends
    # SIGTERM to stop gracefully), so the child ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Die with the parent from the first instant: a spare child can wait for a long time, and
    # a parent killed with -9 must not leave it behind (the parent pid comes as argv[1]).
    if len(sys.argv) > 1:
        _die_with_parent(int(sys.argv[1]))
    # Import the heavy parts (OR-Tools: ~1.3 s) before waiting for the request, so a spare
    # child started ahead of time (`solver.process.SpareChild`) answers at once. They are
    # loaded before the memory cap is set, so the cap measures the solve itself.
    from loguru import logger

    from solver.protocol import (
        ChildMessage,
        ErrorMessage,
        OutOfMemoryMessage,
        PlanMessage,
        ProgressMessage,
        SolveRequest,
        encode,
    )
    from solver.search import solve

    line = sys.stdin.readline()
    if not line:  # a spare child whose parent went away, or was never used
        return
    try:
        request = SolveRequest.model_validate_json(line)
    except ValueError as exc:  # pydantic.ValidationError: a parent of another version?
        print(encode(ErrorMessage(message=f"invalid solve request: {exc}")), flush=True)
        return
    _die_with_parent(request.parent_pid)
    # The protocol owns the real stdout; anything else printed goes to stderr (a log file).
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    send_lock = threading.Lock()

    def send(message: ChildMessage) -> None:
        with send_lock, contextlib.suppress(OSError, ValueError):
            out.write(encode(message) + "\n")
            out.flush()

    memory_limit_mb = request.memory_limit_mb
    logger.remove()
    logger.add(sys.stderr, level="INFO", diagnose=False)
    problem = request.problem_to_solve()
    baseline = vm_size_mb()
    if baseline >= memory_limit_mb:
        send(OutOfMemoryMessage(
            message=f"memory limit {memory_limit_mb} MiB is below the solver's baseline "
                    f"footprint ({baseline:.0f} MiB of address space)"))
        return
    limit = memory_limit_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def run() -> None:
        try:
            plan = solve(problem, on_progress=lambda p: send(ProgressMessage(progress=p)),
                         stop=stop, num_workers=request.num_workers)
            plan.peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            send(PlanMessage(plan=plan))
        except MemoryError:
            send(OutOfMemoryMessage(
                message=f"solver ran out of memory (limit {memory_limit_mb} MiB)"))
        except BaseException as exc:  # reported to the parent, then the child exits
            send(ErrorMessage(message=f"{type(exc).__name__}: {exc}"))

    worker = threading.Thread(target=run, name="solve", daemon=True)
    worker.start()
    # The main thread waits interruptibly, so the SIGTERM handler runs at once, and watches
    # for the parent going away.
    while worker.is_alive():
        worker.join(0.2)
        if os.getppid() != request.parent_pid:
            stop.set()
            os._exit(1)
    out.close()


if __name__ == "__main__":
    main()
