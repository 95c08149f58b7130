"""The local stack's decisions, without a stack: package versions, server settings, error lines.

Each of these is a pure function of what a tool printed (apt-cache, postgres --describe-config,
the Realtime server's log), so the branches a given machine never takes are tested too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from devstack import packages, stack
from devstack.packages import PackageError, PackageState, parse_policy, to_install
from devstack.postgres import (
    DevStackError,
    cluster_settings,
    parse_describe_config,
    plugin_settings,
    render_conf,
)
from devstack.settings import DevSettings

POLICY = """\
postgresql-15:
  Installed: 15.18-0+deb12u1
  Candidate: 15.20-0+deb12u1
  Version table:
     15.20-0+deb12u1 500
        500 http://deb.debian.org/debian-security bookworm-security/main amd64 Packages
 *** 15.18-0+deb12u1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
postgresql-15-cron:
  Installed: (none)
  Candidate: 1.4.2-2+b1
  Version table:
     1.4.2-2+b1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
postgresql-15-wal2json:
  Installed: 2.5-1+b1
  Candidate: 2.5-1+b1
  Version table:
 *** 2.5-1+b1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
pgbouncer:
  Installed: 1.18.0-1+deb12u1
  Candidate: 1.18.0-1+deb12u1
  Version table:
 *** 1.18.0-1+deb12u1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
        100 /var/lib/dpkg/status
"""


def test_apt_policy_is_parsed_per_package():
    states = parse_policy(POLICY)
    assert states == {
        "postgresql-15": PackageState("postgresql-15", "15.18-0+deb12u1", "15.20-0+deb12u1"),
        "postgresql-15-cron": PackageState("postgresql-15-cron", None, "1.4.2-2+b1"),
        "postgresql-15-wal2json": PackageState("postgresql-15-wal2json", "2.5-1+b1",
                                               "2.5-1+b1"),
        "pgbouncer": PackageState("pgbouncer", "1.18.0-1+deb12u1", "1.18.0-1+deb12u1"),
    }


def test_outside_ci_only_missing_packages_are_installed():
    states = parse_policy(POLICY)
    assert to_install(states, missing=["postgresql-15-cron"], upgrade=False) == [
        "postgresql-15-cron"]
    assert to_install(states, missing=[], upgrade=False) == []


def test_ci_upgrades_every_package_that_is_not_at_the_candidate():
    states = parse_policy(POLICY)
    assert to_install(states, missing=["postgresql-15-cron"], upgrade=True) == [
        "postgresql-15", "postgresql-15-cron"]
    current = {n: PackageState(n, "1", "1") for n in packages.DEBIAN_PACKAGES}
    assert to_install(current, missing=[], upgrade=True) == []


def test_a_package_apt_cannot_find_is_a_clear_error():
    states = parse_policy(POLICY.replace("Candidate: 1.4.2-2+b1", "Candidate: (none)"))
    with pytest.raises(PackageError, match=r"apt has no candidate for postgresql-15-cron"):
        to_install(states, missing=["postgresql-15-cron"], upgrade=False)
    unknown = {k: v for k, v in parse_policy(POLICY).items() if k != "postgresql-15-wal2json"}
    with pytest.raises(PackageError, match="postgresql-15-wal2json"):
        to_install(unknown, missing=[], upgrade=True)


def test_ensure_runs_the_stop_hook_once_and_before_apt_changes_anything(
    monkeypatch: pytest.MonkeyPatch,
):
    """The order `ensure` keeps (stop, then install), with apt replaced by a recorder."""
    calls: list[str] = []
    monkeypatch.setattr(packages.os, "geteuid", lambda: 0)
    monkeypatch.setattr(packages, "missing_packages", lambda: [])
    monkeypatch.setattr(packages, "query_states", lambda: parse_policy(POLICY))
    monkeypatch.setattr(packages, "_apt", lambda *a: calls.append(" ".join(a)))
    changed = packages.ensure(upgrade=True, before_change=lambda: calls.append("stop"))
    assert changed == ["postgresql-15", "postgresql-15-cron"]
    assert calls == ["update -qq", "stop", "install -y -qq postgresql-15 postgresql-15-cron"]

    calls.clear()
    current = {n: PackageState(n, "1", "1") for n in packages.DEBIAN_PACKAGES}
    monkeypatch.setattr(packages, "query_states", lambda: current)
    assert packages.ensure(upgrade=True, before_change=lambda: calls.append("stop")) == []
    assert calls == ["update -qq"]  # nothing to change: the stack keeps running

    calls.clear()
    assert packages.ensure(upgrade=False, before_change=lambda: calls.append("stop")) == []
    assert calls == []  # outside CI, nothing missing: apt is not even asked


def test_ensure_as_non_root_names_the_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(packages.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(packages, "missing_packages", lambda: ["postgresql-15-wal2json"])
    with pytest.raises(PackageError, match=r"as root with: apt-get update && .*apt-get install"):
        packages.ensure()


DESCRIBE_15_20 = (
    "wal_level\tpostmaster\tWrite-Ahead Log / Settings\tENUM\treplica\t\t\tSets the level.\t\n"
    "output_plugin_libraries\tsuperuser\tReplication / Sending Servers\tSTRING\t"
    "pgoutput, test_decoding\t\t\tLists libraries that may be named as logical decoding "
    "output plugins.\tUsers with REPLICATION privileges may only use plugins in this list.\n"
)
DESCRIBE_15_18 = DESCRIBE_15_20.splitlines(keepends=True)[0]


def test_servers_that_know_output_plugin_libraries_get_wal2json_added_to_their_default():
    known = parse_describe_config(DESCRIBE_15_20)
    assert known["output_plugin_libraries"] == "pgoutput, test_decoding"
    assert plugin_settings(known) == {
        "output_plugin_libraries": "pgoutput, test_decoding, wal2json"}
    # Already allowed (a future default): not added twice.
    assert plugin_settings({"output_plugin_libraries": "wal2json,pgoutput"}) == {
        "output_plugin_libraries": "wal2json, pgoutput"}


def test_older_servers_get_no_output_plugin_setting():
    """15.18 and earlier do not know the parameter, and refuse to start when they meet it."""
    known = parse_describe_config(DESCRIBE_15_18)
    assert "wal_level" in known and "output_plugin_libraries" not in known
    assert plugin_settings(known) == {}
    conf = render_conf(cluster_settings(DevSettings(), known))
    assert "output_plugin_libraries" not in conf and "wal_level = 'logical'" in conf


def test_rendered_conf_quotes_every_value():
    conf = render_conf({"log_line_prefix": "%m [%p] it's ", "port": "5"})
    assert conf.splitlines()[1:] == ["log_line_prefix = '%m [%p] it''s '", "port = '5'"]


WAL2JSON_REFUSED = """\
2026-12-01 20:18:11.600 | INFO     | devstack.realtime.app:start:60 - listening on 127.0.0.1:54330
2026-12-01 20:18:27.835 | INFO     | devstack.realtime.replication:_stream_once:155 - replication connection closed
2026-12-01 20:18:27.835 | WARNING  | devstack.realtime.replication:_run:104 - replication stream lost (InsufficientPrivilege: library "wal2json" may not be used as an output plugin
HINT:  If it is safe for all REPLICATION users to use this library as an output plugin, add it to "output_plugin_libraries" and reload the server configuration.); retrying in 5.0s
2026-12-01 20:18:28.001 | INFO     | devstack.realtime.app:healthz:99 - still starting
"""  # noqa: E501


def test_last_error_is_the_last_warning_with_its_hint_on_one_line():
    line = stack.last_error(WAL2JSON_REFUSED)
    assert line is not None and "\n" not in line
    assert line.startswith('replication stream lost (InsufficientPrivilege: library "wal2json"')
    assert 'add it to "output_plugin_libraries"' in line
    hint = stack.realtime_hint(line, DevSettings())
    assert "output_plugin_libraries" in hint and "planner dev up" in hint


def test_last_error_of_a_crash_is_the_exception_line():
    log = WAL2JSON_REFUSED + (
        "Traceback (most recent call last):\n"
        '  File "/x/app.py", line 1, in <module>\n'
        "OSError: [Errno 98] error while attempting to bind on address "
        "('127.0.0.1', 54330): address already in use\n"
        "Future exception was never retrieved\n"
        "future: <Future finished exception=ConnectionError('unexpected connection_lost()')>\n"
        "ConnectionError: unexpected connection_lost() call\n"
    )
    line = stack.last_error(log)
    assert line is not None and line.startswith("OSError: [Errno 98]")
    assert "PLANNER_DEV_REALTIME_PORT" in stack.realtime_hint(line, DevSettings())


def test_last_error_of_a_quiet_log():
    assert stack.last_error("") is None
    assert stack.last_error("just one line\n") == "just one line"
    assert stack.realtime_hint(None, DevSettings()).endswith("run `planner dev up` again")


def test_planner_command_is_relative_to_the_checkout(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path):
    exe = stack.planner_command()
    assert Path(exe).name == "planner" and Path(exe).exists()
    monkeypatch.chdir(tmp_path)  # outside the checkout: the absolute path
    assert Path(stack.planner_command()).is_absolute()


def test_package_errors_are_stack_errors():
    """`planner dev` prints every DevStackError as one `error:` line, package errors included."""
    assert issubclass(PackageError, DevStackError)
