"""The two installable parts, checked on what is actually built and installed.

The engine wheel (`planner-engine`, the repository root) is what a production host installs:
listener, solver, the migrations as package data, production dependencies only. The dev
stand-in (`planner-devstack`, the workspace member devstack/) depends on it and adds
`planner dev ...` / `planner demo` through the entry-point group `planner.commands`. The
import contracts in pyproject.toml (`lint-imports`, run by `make lint`) keep the code that way.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from importlib.metadata import EntryPoint, packages_distributions
from pathlib import Path

import grimp
import pytest
import typer

import listener.cli as cli

# Builds wheels and virtualenvs with uv (real components, ~30 s): part of `make test` only.
pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
DEV_ONLY = {"planner-devstack", "psycopg2-binary", "psycopg2", "pyjwt"}


def find_uv() -> str:
    """The uv scripts/bootstrap.sh uses: the one on PATH, else its tool virtualenv's."""
    found = shutil.which("uv") or str(REPO / ".tools/uv/bin/uv")
    assert Path(found).exists(), "uv not found: run scripts/bootstrap.sh first"
    return found


def uv_env() -> dict[str, str]:
    """This environment without what would point uv at the test run's own virtualenv."""
    hidden = ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")
    env = {k: v for k, v in os.environ.items() if k not in hidden}
    env["UV_PYTHON_DOWNLOADS"] = "never"  # only the machine's Python 3.11, as bootstrap does
    return env


def requirement_name(requirement: str) -> str:
    """`psycopg2-binary>=2.9 ; extra == 'x'` -> `psycopg2-binary` (PEP 503 normalised)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


class Wheel:
    """A built wheel: its file names, METADATA and entry points."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with zipfile.ZipFile(path) as zf:
            self.files = set(zf.namelist())
            info = next(n for n in self.files if n.endswith(".dist-info/METADATA"))
            self.metadata = email.parser.Parser().parsestr(zf.read(info).decode())
            eps = next(n for n in self.files if n.endswith(".dist-info/entry_points.txt"))
            self.entry_points = zf.read(eps).decode()

    @property
    def requires(self) -> set[str]:
        return {requirement_name(r) for r in self.metadata.get_all("Requires-Dist") or []}

    def under(self, folder: str) -> set[str]:
        return {n[len(folder) + 1:] for n in self.files if n.startswith(folder + "/")}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Wheel]:
    """Both workspace packages built the way a release would build them (`uv build`)."""
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run(
        [find_uv(), "build", "--all-packages", "--wheel", "--out-dir", str(out), "--quiet"],
        cwd=REPO, env=uv_env(), capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    built = {Wheel(p).metadata["Name"]: Wheel(p) for p in out.glob("*.whl")}
    assert set(built) == {"planner-engine", "planner-devstack"}, built
    return built


def test_engine_wheel_is_the_engine_only(wheels: dict[str, Wheel]):
    engine = wheels["planner-engine"]
    tops = {n.split("/")[0] for n in engine.files if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"listener", "solver"}, tops  # no devstack/, no top-level migrations/
    # The migrations are package data of the engine, where listener/migrate.py looks.
    shipped = {n for n in engine.under("listener/migrations")}
    # The migrations and, beside them, the schema files they were squashed from (the reference
    # a hosted project's operator compares against; the runner applies only the top level).
    sources = REPO / "migrations"
    assert shipped == {str(p.relative_to(sources)) for p in sources.rglob("*.sql")}
    assert {n for n in shipped if "/" not in n} == {p.name for p in sources.glob("*.sql")}
    assert {p.name for p in (REPO / "listener/sql").iterdir() if p.is_file()} <= (
        engine.under("listener/sql"))
    # Requires-Dist is exactly the documented production list, none of the dev stand-in's.
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert engine.requires == {requirement_name(d) for d in declared}
    assert not engine.requires & DEV_ONLY, engine.requires
    assert "planner = listener.cli:app" in engine.entry_points
    assert "planner.commands" not in engine.entry_points


def test_devstack_wheel_depends_on_the_engine_and_plugs_into_its_cli(
    wheels: dict[str, Wheel],
):
    dev = wheels["planner-devstack"]
    expected = {str(p.relative_to(REPO / "devstack")) for p in (REPO / "devstack").rglob("*")
                if p.suffix in (".py", ".sql") and "__pycache__" not in p.parts}
    assert dev.under("devstack") == expected
    assert {n.split("/")[0] for n in dev.files} == {"devstack", "planner_devstack-0.1.0.dist-info"}
    assert {"planner-engine", "psycopg2-binary", "pyjwt", "aiohttp"} <= dev.requires
    assert "[planner.commands]\ndevstack = devstack.cli:register" in dev.entry_points


@pytest.fixture(scope="module")
def clean_venv(
    tmp_path_factory: pytest.TempPathFactory, wheels: dict[str, Wheel]
) -> Iterator[Path]:
    """A virtualenv holding the engine wheel alone, at the locked versions (a production
    install). Run from outside the checkout so nothing of it is importable by accident."""
    base = tmp_path_factory.mktemp("prod")
    uv = find_uv()
    constraints = base / "constraints.txt"
    exported = subprocess.run(
        [uv, "export", "--frozen", "--all-packages", "--no-emit-workspace", "--no-hashes",
         "--no-header", "--no-annotate", "--output-file", str(constraints), "--quiet"],
        cwd=REPO, env=uv_env(), capture_output=True, text=True, timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    venv = base / "venv"
    for cmd in (
        [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
        [uv, "pip", "install", "--quiet", "--python", str(venv / "bin/python"),
         "--constraint", str(constraints), str(wheels["planner-engine"].path)],
    ):
        res = subprocess.run(cmd, cwd=base, env=uv_env(), capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, f"{cmd}\n{res.stderr}"
    yield venv


def run_in(venv: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in uv_env().items() if k != "DATABASE_URL"} | extra_env
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=venv.parent, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_production_install_has_no_dev_stand_in(clean_venv: Path):
    """Engine alone: `planner dev` and `planner demo` name the fix in one line, production
    commands insist on a database URL, the migrations are found inside the wheel."""
    helped = run_in(clean_venv, "planner", "--help")
    assert helped.returncode == 0 and " listen " in helped.stdout
    assert " dev " not in helped.stdout and " demo " not in helped.stdout
    for args in (("dev", "up"), ("dev", "--help"), ("demo",)):
        res = run_in(clean_venv, "planner", *args)
        assert res.returncode == 1, res
        assert res.stderr.splitlines() == [cli.DEV_MISSING.format(name=args[0])]
        assert res.stdout == ""
    for args in (("migrate",), ("runs", "list"), ("history", "list")):
        res = run_in(clean_venv, "planner", *args)
        assert res.returncode == 2, res
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and "set DATABASE_URL or pass --database-url" in lines[0], lines
    probe = run_in(clean_venv, "python", "-c",
                   "import importlib.util, listener.migrate as m\n"
                   "print(importlib.util.find_spec('devstack'), importlib.util.find_spec('jwt'),"
                   " importlib.util.find_spec('psycopg2'))\n"
                   "print(m.MIGRATIONS_DIR)\n"
                   "print(len(m.discover()))")
    assert probe.returncode == 0, probe.stderr
    specs, folder, count = probe.stdout.splitlines()
    # pyjwt may arrive through supabase's own requirements; psycopg2 and devstack never do.
    assert specs.startswith("None ") and specs.endswith(" None"), specs
    assert Path(folder).is_relative_to(clean_venv) and folder.endswith("listener/migrations")
    assert int(count) == len(list((REPO / "migrations").glob("*.sql")))


@pytest.mark.slow
def test_installing_devstack_adds_its_commands(clean_venv: Path, wheels: dict[str, Wheel]):
    """The plugin mechanism itself: installing the member's wheel is all `planner dev` needs."""
    res = subprocess.run(
        [find_uv(), "pip", "install", "--quiet", "--python", str(clean_venv / "bin/python"),
         str(wheels["planner-devstack"].path), str(wheels["planner-engine"].path)],
        cwd=clean_venv.parent, env=uv_env(), capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr
    helped = run_in(clean_venv, "planner", "dev", "--help")
    assert helped.returncode == 0, helped.stderr
    assert all(f" {c} " in helped.stdout for c in ("up", "down", "status", "env", "seed"))
    env = run_in(clean_venv, "planner", "dev", "env")
    assert env.returncode == 0 and "export DATABASE_URL=" in env.stdout, env
    assert " demo " in run_in(clean_venv, "planner", "--help").stdout


def imported_distributions(*packages: str) -> set[str]:
    """The distributions whose modules `packages` import (stdlib left out), from the same
    import graph lint-imports reads; the engine's own packages count as `planner-engine`."""
    graph = grimp.build_graph(*packages, include_external_packages=True)
    owners = packages_distributions() | {"listener": ["planner-engine"],
                                         "solver": ["planner-engine"]}
    found: set[str] = set()
    for module in graph.modules:
        top = module.split(".")[0]
        if top in packages or top in sys.stdlib_module_names:
            continue
        assert top in owners, f"{top} is imported by {packages} but installed by nothing"
        found |= {requirement_name(d) for d in owners[top]}
    return found


@pytest.mark.parametrize("packages, pyproject", [
    (("listener", "solver"), "pyproject.toml"),
    (("devstack",), "devstack/pyproject.toml"),
])
def test_each_part_declares_exactly_what_it_imports(packages: tuple[str, ...], pyproject: str):
    """No dependency is declared for nothing, none is used without being declared (a
    transitive one can vanish with an upgrade of what brings it)."""
    declared = tomllib.loads((REPO / pyproject).read_text())["project"]["dependencies"]
    assert imported_distributions(*packages) == {requirement_name(d) for d in declared}


def contract_names() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return [c["name"] for c in config["contracts"]]


def lint_imports(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-logo", "--no-cache"], cwd=cwd,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_import_contracts_hold():
    """What `make lint` runs: every configured contract is checked and kept."""
    names = contract_names()
    assert len(names) == 3
    res = lint_imports(REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(f"{name} KEPT" in res.stdout for name in names), res.stdout
    assert f"Contracts: {len(names)} kept, 0 broken." in res.stdout


def test_import_contracts_catch_an_offending_import(tmp_path: Path):
    """The same contracts on a copy of the code with three offending modules: each one breaks
    its contract, named with the import that breaks it, and lint-imports exits 1."""
    for part in ("listener", "solver", "devstack"):
        shutil.copytree(REPO / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("__pycache__", "pyproject.toml"))
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "listener/offender.py").write_text("from devstack.realtime import app\n")
    (tmp_path / "solver/offender.py").write_text("import listener.settings\n")
    (tmp_path / "listener/offender_jwt.py").write_text("import jwt\n")
    res = lint_imports(tmp_path, PYTHONPATH=str(tmp_path))
    assert res.returncode == 1, res.stdout + res.stderr
    for name in contract_names():
        assert f"{name} BROKEN" in res.stdout, res.stdout
    assert "Contracts: 0 kept, 3 broken." in res.stdout
    for offence in ("listener.offender -> devstack.realtime",
                    "solver.offender -> listener.settings", "listener.offender_jwt -> jwt"):
        assert offence in res.stdout, res.stdout


def test_plugins_register_commands_and_a_broken_one_costs_a_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
):
    """`load_plugins` on a fresh app: the devstack entry point adds `dev` and `demo`; one that
    cannot be imported is reported in one line and skipped, the engine's commands stay."""
    group = cli.PLUGIN_GROUP
    found = [EntryPoint("devstack", "devstack.cli:register", group),
             EntryPoint("broken", "no_such_module_here:register", group)]
    monkeypatch.setattr(cli, "entry_points", lambda group: found if group == cli.PLUGIN_GROUP
                        else [])
    target = typer.Typer()

    @target.command()
    def listen() -> None:
        """A stand-in for an engine command."""

    assert cli.load_plugins(target) == ["devstack"]
    assert cli.command_names(target) == {"listen", "dev", "demo"}
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "planner plugin broken" in err[0] and "ModuleNotFoundError" in err[0]
    cli.add_missing_dev_commands(target)  # both present: nothing added
    assert len(target.registered_commands) == 2

    bare = typer.Typer()
    cli.add_missing_dev_commands(bare)
    assert cli.command_names(bare) == {"dev", "demo"}
    assert all(c.hidden for c in bare.registered_commands)
