"""The Debian packages the local stack runs on, and what their versions are.

`planner dev up` installs what is missing. Under CI (`scripts/bootstrap.sh` passes `--upgrade`
when `CI=true`) every package is brought to apt's newest candidate, so a point release that
changes behaviour (PostgreSQL 15.19 started refusing wal2json) breaks CI before it breaks a
newcomer's fresh machine. The decisions are pure functions of what apt reports, tested without
apt; the functions that run apt are thin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from devstack.postgres import DevStackError

# What the stack needs, and the file that proves each package is on this machine.
DEBIAN_PACKAGES: dict[str, Path] = {
    "postgresql-15": Path("/usr/lib/postgresql/15/bin/postgres"),
    "postgresql-15-cron": Path("/usr/lib/postgresql/15/lib/pg_cron.so"),
    "postgresql-15-wal2json": Path("/usr/lib/postgresql/15/lib/wal2json.so"),
    # Not part of the stack: the tests run it in front of the stack's PostgreSQL, in
    # transaction mode, as a hosted project's transaction pooler (port 6543): `planner
    # migrate` must refuse it, a listener must solve through it (tests/listener/test_pooler.py).
    "pgbouncer": Path("/usr/sbin/pgbouncer"),
}
# Short names for status output (the stack's own packages).
LABELS = {
    "postgresql-15": "postgresql",
    "postgresql-15-cron": "pg_cron",
    "postgresql-15-wal2json": "wal2json",
}


class PackageError(DevStackError):
    """A package problem with a message that says what to run."""


@dataclass(frozen=True)
class PackageState:
    """One package as apt sees it: the installed version and the one apt would install."""

    name: str
    installed: str | None
    candidate: str | None


def apt_command() -> str:
    """The command a person runs by hand (as root) to get the packages."""
    return (
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "
        + " ".join(DEBIAN_PACKAGES)
    )


def parse_policy(text: str) -> dict[str, PackageState]:
    """Parse `apt-cache policy NAME...` into one state per package.

    `(none)` means not installed (Installed) or not available from any source (Candidate).
    """
    states: dict[str, PackageState] = {}
    name: str | None = None
    installed: str | None = None
    for raw in text.splitlines():
        if raw and not raw[0].isspace() and raw.rstrip().endswith(":"):
            name, installed = raw.rstrip()[:-1], None
            continue
        line = raw.strip()
        if name is None:
            continue
        if line.startswith("Installed:"):
            value = line.split(":", 1)[1].strip()
            installed = None if value == "(none)" else value
        elif line.startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            states[name] = PackageState(name, installed, None if value == "(none)" else value)
    return states


def to_install(states: dict[str, PackageState], missing: list[str], upgrade: bool) -> list[str]:
    """Which packages `apt-get install` must be given.

    Without `upgrade` only the missing ones. With it, also every package whose installed
    version is not apt's candidate (the candidate is the newest version apt would choose).
    A package apt cannot find at all is an error: installing it cannot work.
    """
    needed = list(DEBIAN_PACKAGES) if upgrade else missing
    unavailable = [n for n in needed if n not in states or states[n].candidate is None]
    if unavailable:
        raise PackageError(
            f"apt has no candidate for {', '.join(unavailable)}: is this Debian 12 "
            "(bookworm) with its main and security sources? run `apt-get update` and retry"
        )
    return [
        name for name in DEBIAN_PACKAGES
        if name in missing or (upgrade and states[name].installed != states[name].candidate)
    ]


def missing_packages() -> list[str]:
    """Packages whose files are not on this machine (works without apt)."""
    return [name for name, path in DEBIAN_PACKAGES.items() if not path.exists()]


def installed_versions() -> dict[str, str | None]:
    """`{label: Debian version or None}`, from dpkg; None where dpkg is absent or knows nothing."""
    versions: dict[str, str | None] = {label: None for label in LABELS.values()}
    if shutil.which("dpkg-query") is None:
        return versions
    res = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\t${Version}\n",
         *DEBIAN_PACKAGES],
        capture_output=True, text=True,
    )
    for line in res.stdout.splitlines():
        name, status, version = [*line.split("\t"), "", ""][:3]
        if name in LABELS and status.startswith("ii") and version:
            versions[LABELS[name]] = version
    return versions


def describe(versions: dict[str, str | None]) -> str:
    """`postgresql 15.20-0+deb12u1, pg_cron 1.4.2-2+b1, wal2json 2.5-1+b1`."""
    return ", ".join(f"{name} {version or 'unknown'}" for name, version in versions.items())


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    res = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        raise PackageError(f"apt-get {args[0]} failed: {last}")
    return res


def query_states() -> dict[str, PackageState]:
    res = subprocess.run(["apt-cache", "policy", *DEBIAN_PACKAGES], capture_output=True,
                         text=True, check=False)
    return parse_policy(res.stdout)


def ensure(upgrade: bool = False, before_change: Callable[[], None] | None = None) -> list[str]:
    """Install missing packages; with `upgrade`, bring every one to apt's newest candidate.

    `before_change` runs once before apt changes anything, so the caller can stop
    a cluster whose binaries are about to be replaced. Returns the packages apt was given.
    """
    missing = missing_packages()
    if not missing and not upgrade:
        return []
    root = os.geteuid() == 0
    if not root:
        if missing:
            raise PackageError(
                f"missing Debian packages {', '.join(missing)}; install them as root with: "
                + apt_command()
            )
        logger.info("not root: skipping the package upgrade check")
        return []
    _apt("update", "-qq")
    wanted = to_install(query_states(), missing, upgrade)
    if not wanted:
        logger.info("Debian packages are at apt's newest candidate: {}",
                    describe(installed_versions()))
        return []
    if before_change is not None:
        before_change()
    logger.info("installing Debian packages: {}", " ".join(wanted))
    _apt("install", "-y", "-qq", *wanted)
    still = missing_packages()
    if still:
        raise PackageError(f"apt-get finished but {', '.join(still)} is still missing")
    logger.info("Debian packages now: {}", describe(installed_versions()))
    return wanted
