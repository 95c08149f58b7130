"""Deployment units that need no stack: settings named by their variables, the CPU quota
behind PLANNER_SOLVER_WORKERS, the kinds of API key and how each is sent."""

from __future__ import annotations

import base64
import json
import math
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from listener import apikeys
from listener.cpus import cgroup_cpu_limit, usable_cpus
from listener.settings import ListenerSettings, summarise_errors

BASE = {
    "PLANNER_DATABASE_URL": "postgresql://u:p@db.example:5432/postgres",
    "SUPABASE_URL": "https://ref.supabase.co",
    "SUPABASE_SERVICE_ROLE_KEY": "k",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean environment holding only the three required variables."""
    for name in list(os.environ):
        if name.startswith(("PLANNER_", "SUPABASE_")) or name == "PORT":
            monkeypatch.delenv(name)
    for name, value in BASE.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def settings_error(env: pytest.MonkeyPatch, **values: str) -> str:
    for name, value in values.items():
        env.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        ListenerSettings()  # type: ignore[call-arg]
    return summarise_errors(info.value)


def test_settings_errors_name_the_variable_not_the_field(env: pytest.MonkeyPatch):
    line = settings_error(env, PLANNER_HEARTBEAT_INTERVAL_S="600", PLANNER_SOLVER_WORKERS="0")
    assert "\n" not in line
    assert "PLANNER_HEARTBEAT_INTERVAL_S: Input should be less than or equal to 60 (got '600')" \
        in line
    assert "PLANNER_SOLVER_WORKERS" in line
    assert "heartbeat_interval_s" not in line and "solver_workers" not in line
    env.delenv("SUPABASE_SERVICE_ROLE_KEY")
    env.delenv("PLANNER_HEARTBEAT_INTERVAL_S")
    env.delenv("PLANNER_SOLVER_WORKERS")
    assert settings_error(env) == (
        "SUPABASE_SECRET_KEY or SUPABASE_SERVICE_ROLE_KEY is not set")


def test_secrets_never_appear_in_settings_errors(env: pytest.MonkeyPatch):
    line = settings_error(env, PLANNER_DATABASE_URL="mysql://user:hunter2@h/db")
    assert line == "PLANNER_DATABASE_URL: must be a postgresql:// URL"


@pytest.mark.parametrize("given, level", [("info", "INFO"), (" Debug ", "DEBUG"),
                                          ("WARNING", "WARNING")])
def test_log_level_is_case_insensitive(env: pytest.MonkeyPatch, given: str, level: str):
    env.setenv("PLANNER_LOG_LEVEL", given)
    assert ListenerSettings().log_level == level  # type: ignore[call-arg]


def test_health_port_falls_back_to_the_platforms_port(env: pytest.MonkeyPatch):
    assert ListenerSettings().health_port == 8080  # type: ignore[call-arg]
    env.setenv("PORT", "9123")
    assert ListenerSettings().health_port == 9123  # type: ignore[call-arg]
    env.setenv("PLANNER_HEALTH_PORT", "9200")  # the explicit variable wins
    assert ListenerSettings().health_port == 9200  # type: ignore[call-arg]


def test_secret_key_variable_wins_over_the_legacy_one(env: pytest.MonkeyPatch):
    env.setenv("SUPABASE_SECRET_KEY", "sb_secret_abc")
    s = ListenerSettings()  # type: ignore[call-arg]
    assert s.service_role_key.get_secret_value() == "sb_secret_abc"


@pytest.mark.parametrize("url, pooler, expected", [
    ("postgresql://u:p@aws-0-eu.pooler.supabase.com:6543/postgres", "auto", True),
    ("postgresql://u:p@aws-0-eu.pooler.supabase.com:5432/postgres", "auto", False),
    ("postgresql://u:p@db.ref.supabase.co/postgres", "auto", False),
    ("postgresql://u:p@127.0.0.1:6432/postgres", "Transaction", True),
    ("postgresql://u:p@127.0.0.1:6543/postgres", "session", False),
])
def test_transaction_pooler_setting(env: pytest.MonkeyPatch, url: str, pooler: str,
                                    expected: bool):
    env.setenv("PLANNER_DATABASE_URL", url)
    env.setenv("PLANNER_DATABASE_POOLER", pooler)
    assert ListenerSettings().transaction_pooler is expected  # type: ignore[call-arg]


# -- the CPU quota ---------------------------------------------------------------------------
def fake_cgroup(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    root.mkdir(exist_ok=True)
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text(membership)
    return root, self_cgroup


def test_cgroup_v2_quota_of_the_process_or_a_parent(tmp_path: Path):
    root, me = fake_cgroup(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "cpu.max": "max 100000\n",
        "kubepods/pod1/cpu.max": "250000 100000\n",  # 2.5 CPUs on the pod
        "kubepods/pod1/ctr/cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_limit(root, me) == 2.5
    assert usable_cpus(root, me) == min(len(os.sched_getaffinity(0)), 2)


def test_cgroup_v2_inside_a_container_reads_its_root(tmp_path: Path):
    root, me = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "50000 100000\n"})
    assert cgroup_cpu_limit(root, me) == 0.5
    assert usable_cpus(root, me) == 1  # a fraction of a CPU still runs one worker


def test_cgroup_v1_cfs_quota(tmp_path: Path):
    root, me = fake_cgroup(tmp_path, "4:memory:/x\n2:cpu,cpuacct:/docker/abc\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
    })
    assert cgroup_cpu_limit(root, me) == 3.0
    assert usable_cpus(root, me) == min(len(os.sched_getaffinity(0)), 3)


def test_no_quota_means_the_cpus_we_may_run_on(tmp_path: Path):
    root, me = fake_cgroup(tmp_path, "1:cpu:/\n0::/\n", {
        "cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n",
        "cpu.max": "max 100000\n",
    })
    assert cgroup_cpu_limit(root, me) is None
    assert usable_cpus(root, me) == len(os.sched_getaffinity(0))
    # Missing files (no cgroup fs at all) are no limit either.
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "none2") is None


def test_workers_default_follows_the_quota(env: pytest.MonkeyPatch, tmp_path: Path):
    root, me = fake_cgroup(tmp_path, "0::/\n", {"cpu.max": "100000 100000\n"})
    env.setattr("listener.cpus.CGROUP_ROOT", root)
    env.setattr("listener.cpus.SELF_CGROUP", me)
    assert ListenerSettings().solver_workers == 1  # type: ignore[call-arg]
    assert math.isclose(cgroup_cpu_limit(root, me) or 0, 1.0)


# -- API keys -------------------------------------------------------------------------------
def jwt_with(claims: dict[str, object]) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@pytest.mark.parametrize("key, kind, ok", [
    ("sb_secret_N7UND0UgjKTVK", "secret", True),
    ("sb_publishable_ACJWlzQHlZjB", "publishable", False),
    (jwt_with({"role": "service_role", "iss": "supabase"}), "jwt", True),
    (jwt_with({"role": "anon", "iss": "supabase"}), "jwt", False),
    (jwt_with({"iss": "supabase"}), "jwt", False),
    ("not-a-key", "unknown", False),
    ("a.b.c", "unknown", False),
])
def test_key_kinds(key: str, kind: str, ok: bool):
    assert apikeys.classify(key).kind == kind
    problem = apikeys.key_problem(key, "SUPABASE_SECRET_KEY")
    assert (problem is None) is ok
    if problem:
        assert problem.startswith("SUPABASE_SECRET_KEY holds ") and "sb_secret_" in problem
        assert key not in problem, "the key itself is never printed"


def test_every_deploy_guide_link_in_messages_has_its_section():
    """Error lines point operators at docs/deploy.md#<section>: each section must exist."""
    import re

    repo = Path(__file__).resolve().parents[2]
    headings = re.findall(r"^#+ (.+)$", (repo / "docs/deploy.md").read_text(), re.M)
    anchors = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    cited: set[str] = set()
    for path in [*(repo / "listener").glob("*.py"), repo / "README.md"]:
        cited |= set(re.findall(r"deploy\.md#([\w\-]+)", path.read_text()))
    # The guide's own table of contents and cross-references.
    cited |= set(re.findall(r"\]\(#([\w\-]+)\)", (repo / "docs/deploy.md").read_text()))
    assert cited, "no links found"
    assert cited <= anchors, cited - anchors


def test_dev_env_holds_keys_of_both_kinds():
    """`planner dev env` prints both generations: each of the service-role kind passes the
    listener's start-up check, each of the anon kind is refused by it."""
    from devstack import stack
    from devstack.settings import DevSettings

    env = stack.env(DevSettings())
    assert env["SUPABASE_SECRET_KEY"].startswith("sb_secret_")
    assert env["SUPABASE_PUBLISHABLE_KEY"].startswith("sb_publishable_")
    for name in ("SUPABASE_SECRET_KEY", "SUPABASE_SERVICE_ROLE_KEY"):
        assert apikeys.key_problem(env[name], name) is None, name
    for name in ("SUPABASE_PUBLISHABLE_KEY", "SUPABASE_ANON_KEY"):
        assert apikeys.key_problem(env[name], name) is not None, name
