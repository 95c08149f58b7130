"""How many CPUs this process may really use: the default of PLANNER_SOLVER_WORKERS.

`os.cpu_count()` counts the host's CPUs, but a container is usually limited by a CPU quota
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`): 8 CP-SAT workers under a
2-CPU quota get throttled in bursts and solve worse than 2. The usable count is the smallest of
the CPUs we may be scheduled on (affinity) and the quota of our cgroup or any of its parents,
rounded down (a fractional CPU cannot run a whole worker), and at least 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestry(base: Path, relative: str) -> list[Path]:
    """`base/relative` and each of its parents up to `base` itself (quotas nest)."""
    parts = [p for p in relative.strip("/").split("/") if p and p != ".."]
    return [base.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2_quota(text: str | None) -> float | None:
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(quota_text: str | None, period_text: str | None) -> float | None:
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root: Path | None = None, self_cgroup: Path | None = None) -> float | None:
    """The tightest CPU quota on this process's cgroups, in CPUs, or None when unlimited."""
    root = root or CGROUP_ROOT
    membership = _read(self_cgroup or SELF_CGROUP) or ""
    limits: list[float] = []
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            # cgroup v2 (unified): one tree, the quota in cpu.max at each level.
            for folder in _ancestry(root, relative):
                q = _v2_quota(_read(folder / "cpu.max"))
                if q is not None:
                    limits.append(q)
        elif "cpu" in controllers.split(","):
            # cgroup v1: the cpu controller's own tree (mounted as cpu,cpuacct or cpu).
            for mount in (root / controllers, root / "cpu,cpuacct", root / "cpu"):
                if not mount.is_dir():
                    continue
                for folder in _ancestry(mount, relative):
                    q = _v1_quota(_read(folder / "cpu.cfs_quota_us"),
                                  _read(folder / "cpu.cfs_period_us"))
                    if q is not None:
                        limits.append(q)
                break
    return min(limits) if limits else None


def usable_cpus(root: Path | None = None, self_cgroup: Path | None = None) -> int:
    """CPUs this process can keep busy: affinity, then the cgroup quota, at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        count = min(count, math.floor(limit))
    return max(1, count)
