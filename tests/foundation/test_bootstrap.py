"""`scripts/bootstrap.sh` as on stock Debian 12: only /usr/bin and /bin on PATH, so the Python
found is Debian's (which refuses `pip install`, PEP 668) and no uv is found."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEBIAN_PATH = "/usr/bin:/bin"
# Starts real components of its own (PostgreSQL, apt, uv): part of `make test` only.
pytestmark = pytest.mark.stack


def checkout_copy(dest: Path) -> Path:
    """The files git would hand a fresh clone (tracked and not ignored), copied to `dest`."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for name in filter(None, names):
        src = REPO / name
        if src.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A folder any OS user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="bootstrap-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def debian_env(**extra: str) -> dict[str, str]:
    """This machine's environment (certificates, proxies) on Debian's PATH, without what
    points at another Python or uv, and without CI (so apt only installs what is missing)."""
    hidden = ("PYENV", "UV_", "VIRTUAL_ENV", "CONDA", "PYTHON")
    env = {k: v for k, v in os.environ.items() if not k.startswith(hidden) and k != "CI"}
    env.update({"PATH": DEBIAN_PATH, "LANG": "C.UTF-8", **extra})
    return env


def test_bootstrap_on_debian_python_installs_uv_into_a_tool_virtualenv(tmp_path: Path):
    assert Path("/usr/lib/python3.11/EXTERNALLY-MANAGED").exists()  # the PEP 668 refusal
    assert shutil.which("uv", path=DEBIAN_PATH) is None
    repo = checkout_copy(tmp_path / "clone")
    res = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=repo, env=debian_env(),
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert "installing uv" in res.stderr and (repo / ".tools/uv/bin/uv").exists()
    assert "Debian packages already in place" in res.stdout
    # .venv is built on Debian's interpreter, and the CLI runs.
    cfg = (repo / ".venv/pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg, cfg
    # Both parts are installed: the engine's commands and the dev stand-in's plugin.
    for args, shown in ((["--help"], " dev "), (["dev", "--help"], " up "),
                        (["listen", "--help"], "Procfile")):
        cli = subprocess.run([str(repo / ".venv/bin/planner"), *args], capture_output=True,
                             text=True, env=debian_env(), timeout=120)
        assert cli.returncode == 0 and shown in cli.stdout, (args, cli.stdout, cli.stderr)
    # A second run reuses the tool virtualenv and is quiet about uv.
    again = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=repo, env=debian_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "installing uv" not in again.stderr, again.stderr


def test_bootstrap_without_python3_venv_says_what_to_install(world_readable_dir: Path):
    """Not root, and python3 cannot make virtualenvs (python3-venv missing): one line that
    names the package. The missing package is played by a `python3` that fails the check."""
    repo = world_readable_dir / "clone"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts/bootstrap.sh", repo / "scripts/bootstrap.sh")
    stub = world_readable_dir / "bin"
    stub.mkdir()
    (stub / "python3").write_text(
        '#!/bin/sh\n[ "$1" = -c ] && exit 1\nexec /usr/bin/python3 "$@"\n')
    (stub / "python3").chmod(0o755)
    res = subprocess.run(
        ["/usr/sbin/runuser", "-u", "nobody", "--", "bash", "scripts/bootstrap.sh"], cwd=repo,
        env=debian_env(PATH=f"{stub}:{DEBIAN_PATH}", HOME=str(world_readable_dir)),
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 1
    assert res.stderr.splitlines() == [
        "bootstrap: python3 cannot create virtualenvs; install it with: "
        "sudo apt-get install -y python3-venv"
    ]
    assert not (repo / ".tools").exists()
