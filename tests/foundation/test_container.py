"""The container image's steps, without Docker (this machine and CI have no daemon).

The Dockerfile's build stage runs scripts/build-venv.sh; its run stage copies the virtualenv,
switches to an unprivileged user and runs `planner listen` with the platform's $PORT, checked by
a HEALTHCHECK on /livez. Here the same script builds a virtualenv outside the checkout, and the
listener runs from it as an unprivileged user (`nobody` when the tests run as root) against the
local stack, with $PORT set and no PLANNER_HEALTH_PORT; then /livez, /readyz and the
HEALTHCHECK's own command are probed. hadolint (`make lint`) checks the Dockerfile itself.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.settings import DevSettings
from tests.foundation.test_packaging import REPO, find_uv, uv_env
from tests.support.harness import ListenerProcess, listener_env
from tests.support.realtime import RealtimeServer, free_port

pytestmark = pytest.mark.stack

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = str(Path(sys.executable).with_name("hadolint"))
#: Who runs the listener here: like the image's USER, never root.
RUN_AS = "nobody" if os.geteuid() == 0 else None


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_passes_hadolint():
    res = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_is_what_this_test_runs():
    """The image builds with the script tested below, runs as a non-root user, and checks
    /livez: if the Dockerfile drifts from these steps, this test says so."""
    steps = dockerfile_instructions()
    stages = [args for word, args in steps if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith(" AS build"), stages
    runs = [args for word, args in steps if word == "RUN"]
    assert any("scripts/build-venv.sh /opt/planner" in r for r in runs), runs
    pinned = re.search(r"^UV_VERSION=(\S+)$", (REPO / "scripts/bootstrap.sh").read_text(), re.M)
    assert pinned and any(f"uv=={pinned.group(1)}" in r for r in runs), "the uv of bootstrap"
    user = [args for word, args in steps if word == "USER"]
    assert user and user[-1] not in ("root", "0"), user
    final = steps[[w for w, _ in steps].index("FROM", 1):]
    assert ("COPY", "--from=build /opt/planner /opt/planner") in final
    assert not any(w == "COPY" and "--from" not in a for w, a in final), \
        "the run stage gets nothing but the virtualenv"
    assert json.loads(dict(final)["CMD"]) == ["planner", "listen"]
    assert "/livez" in dict(final)["HEALTHCHECK"]


def image_python() -> str:
    """A Python 3.11 every user may run, like the image's /usr/local/bin/python3.11 (the test
    run's own may live under root's home, which `nobody` cannot enter)."""
    for candidate in ("/usr/local/bin/python3.11", "/usr/bin/python3.11"):
        if os.access(candidate, os.X_OK) and os.stat(candidate).st_mode & 0o001:
            return candidate
    return sys.executable


def healthcheck_command() -> list[str]:
    args = dict(dockerfile_instructions())["HEALTHCHECK"]
    command = json.loads(args[args.index("CMD") + 3:].strip())
    assert isinstance(command, list) and command[0] == "python"
    return [str(c) for c in command]


@pytest.fixture(scope="module")
def image_venv() -> Iterator[Path]:
    """The image's /opt/planner, built by the Dockerfile's script in a folder outside the
    checkout that the unprivileged user can read."""
    base = Path(tempfile.mkdtemp(prefix="planner-image-"))
    base.chmod(0o755)
    venv = base / "opt-planner"
    res = subprocess.run(
        ["bash", str(REPO / "scripts/build-venv.sh"), str(venv), image_python()],
        cwd=REPO, env={**uv_env(), "UV": find_uv()}, capture_output=True, text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        yield venv
    finally:
        shutil.rmtree(base, ignore_errors=True)


def as_user(venv: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], env=env, user=RUN_AS,
                          cwd=venv.parent, capture_output=True, text=True, timeout=60)


def image_env(base: dict[str, str], venv: Path, port: int) -> dict[str, str]:
    """The image's environment: its PATH first, $PORT from the platform, no
    PLANNER_HEALTH_PORT, nothing pointing into the checkout."""
    env = {k: v for k, v in base.items()
           if k not in ("PLANNER_HEALTH_PORT", "VIRTUAL_ENV", "PYTHONPATH", "DATABASE_URL")}
    return env | {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PORT": str(port),
                  "PYTHONUNBUFFERED": "1", "HOME": "/tmp"}


def test_the_image_venv_holds_the_engine_only(image_venv: Path):
    res = as_user(image_venv, "python", "-c",
                  "import importlib.util as u; print(u.find_spec('devstack'), "
                  "u.find_spec('pytest'), u.find_spec('listener') is not None)",
                  env=image_env(dict(os.environ), image_venv, 0))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["None", "None", "True"]


async def test_the_image_serves_health_on_port_as_an_unprivileged_user(
    image_venv: Path, dev_settings: DevSettings, db_name: str, rt_server: RealtimeServer,
):
    port = free_port()
    env = image_env(listener_env(dev_settings, db_name, rt_server.url), image_venv, port)
    log_dir = Path(tempfile.mkdtemp(prefix="planner-image-log-"))
    log_dir.chmod(0o777)
    # As the image runs it: the virtualenv's `planner`, an unprivileged user, cwd outside.
    proc = ListenerProcess({**env, "PLANNER_WORKER_ID": "image"}, log_dir / "listener.log",
                           worker_id="image", health_port=port)
    with (log_dir / "listener.log").open("ab") as log:
        proc.proc = subprocess.Popen([str(image_venv / "bin/planner"), "listen"], env=proc.env,
                                     stdout=log, stderr=subprocess.STDOUT, user=RUN_AS,
                                     cwd=image_venv.parent, stdin=subprocess.DEVNULL)
    try:
        await proc.wait_ready(timeout_s=60)
        status, ready = proc.readiness()
        assert status == 200 and ready["self_check"] is True and ready["worker_id"] == "image"
        with open(f"/proc/{proc.proc.pid}/status") as fh:
            uid = next(int(ln.split()[1]) for ln in fh if ln.startswith("Uid:"))
        assert uid != 0 and uid == (pwd.getpwnam(RUN_AS).pw_uid if RUN_AS else os.getuid())
        # The HEALTHCHECK exactly as written in the Dockerfile, with the image's python.
        check = as_user(image_venv, *healthcheck_command(), env=env)
        assert check.returncode == 0, check.stderr
        proc.stop_now()
        assert proc.proc.returncode == 0, proc.log()  # SIGTERM drains and exits 0
        # With the listener gone, the HEALTHCHECK fails (so it can fail).
        assert as_user(image_venv, *healthcheck_command(), env=env).returncode != 0
    finally:
        proc.stop_now()
        shutil.rmtree(log_dir, ignore_errors=True)
