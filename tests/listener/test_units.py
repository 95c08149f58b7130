"""The listener's pure parts: queue order, named queries, readable validation errors, settings."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from listener.executor import summarise_validation
from listener.queries import queries
from listener.run_queue import Wakeup
from listener.settings import ListenerSettings
from solver import Problem

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def test_wakeup_only_wakes_and_loses_no_hint():
    """The wake-up decides no order: it says "claim now" and which runs were hinted since the
    last claim; a hint during a claim wakes the loop again."""
    w = Wakeup()
    a, b = uuid.uuid4(), uuid.uuid4()
    assert not w.is_set()
    assert w.hint(a) and w.hint(b)
    assert not w.hint(a), "a duplicate event is not a new hint"
    await asyncio.wait_for(w.wait(), timeout=1)
    assert w.take() == {a, b} and not w.is_set()
    assert w.hint(a), "after a claim the same run may be hinted again"
    assert w.is_set() and w.take() == {a}
    w.poke()
    assert w.is_set() and w.take() == set()


def test_every_named_query_is_present():
    names = set(queries())
    assert {"claim_run", "heartbeat", "load_problem", "commit_plan", "finish_run",
            "write_logs", "pending_runs", "ping", "listener_heartbeat", "queue_positions"} <= names


def _raw_problem(**over: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "terms": [{"id": "t1", "name": "Term 1", "weeks": 10},
                  {"id": "t2", "name": "Term 2", "weeks": 10}],
        "teams": [
            {"id": "a", "name": "Gen Med", "specialty": "medicine", "subspecialty": "medicine",
             "kind": "clinical", "experiences": ["A"], "site": None, "rural": False, "tags": []},
            {"id": "b", "name": "Surgery", "specialty": "surgery", "subspecialty": "general",
             "kind": "clinical", "experiences": ["B"], "site": "MMC", "rural": False, "tags": []},
        ],
        "demand": [{"team": "a", "term": "t1", "min": 1, "max": 2},
                   {"team": "b", "term": "t1", "min": 0, "max": 2},
                   {"team": "a", "term": "t2", "min": 0, "max": 2},
                   {"team": "b", "term": "t2", "min": 1, "max": 2}],
        "n_job_lines": 2,
        "rule_sets": [],
        "previous_plan": {"lines": [
            {"line": 1, "rotations": {"t1": "a", "t2": "b"}, "pinned": ["t1"]},
        ]},
        "options": {},
    }
    raw.update(over)
    return raw


def test_load_problem_shape_is_the_solver_problem_as_is():
    """What load_problem returns (tests/db checks the SQL side) needs no adapting."""
    problem = Problem.model_validate(_raw_problem())
    assert problem.team("a").site is None and problem.options.keep_pinned
    with pytest.raises(ValidationError, match="bogus"):
        Problem.model_validate(_raw_problem(options={"bogus": 1}))
    with pytest.raises(ValidationError, match="beyond n_job_lines"):
        Problem.model_validate(_raw_problem(previous_plan={"lines": [
            {"line": 3, "rotations": {"t1": "b", "t2": "a"}, "pinned": []}]}))


def test_validation_summary_is_one_readable_line():
    bad = _raw_problem(rule_sets=["NOPE"], n_job_lines=0)
    with pytest.raises(ValidationError) as info:
        Problem.model_validate(bad)
    line = summarise_validation(info.value)
    assert "\n" not in line and "n_job_lines" in line
    assert "https://" not in line


def test_settings_refuse_bad_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PLANNER_DATABASE_URL", "mysql://nope")
    monkeypatch.setenv("SUPABASE_URL", "ftp://x")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "k")
    with pytest.raises(ValidationError) as info:
        ListenerSettings()  # type: ignore[call-arg]
    fields = {str(e["loc"][0]) for e in info.value.errors()}
    assert fields == {"PLANNER_DATABASE_URL", "SUPABASE_URL"}
    monkeypatch.setenv("PLANNER_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv("SUPABASE_URL", "http://127.0.0.1:1/")
    monkeypatch.setenv("PLANNER_HEARTBEAT_INTERVAL_S", "2")
    s = ListenerSettings()  # type: ignore[call-arg]
    assert s.supabase_url == "http://127.0.0.1:1" and s.heartbeat_interval_s == 2
    assert "p@h" not in repr(s), "secrets never appear in reprs or logs"


def test_validation_summary_escapes_line_breaks_in_junk_keys():
    """Found by the loader property: a previous-plan key "\\n" broke the one-line error."""
    bad = _raw_problem(previous_plan={"\n": None})
    with pytest.raises(ValidationError) as info:
        Problem.model_validate(bad)
    line = summarise_validation(info.value)
    assert "\n" not in line and "'\\n'" in line


def test_readiness_waits_for_changes_to_flow():
    """Found by the oldest-first end-to-end test: "subscribed" came before the server's
    "Subscribed to PostgreSQL", and realtime-py hands that message as a pydantic model (the
    link only read dicts, so its resync on it never fired)."""
    from realtime.message import SuccessSystemPayload
    from realtime.types import RealtimeSubscribeStates

    from listener.realtime_link import RealtimeLink

    resyncs: list[int] = []
    link = RealtimeLink("http://127.0.0.1:1", "k", on_run=lambda *_: None,
                        on_subscribed=lambda: resyncs.append(1))
    link._on_state(RealtimeSubscribeStates.SUBSCRIBED, None)
    assert link.subscribed and not link.changes_flowing
    link._on_system(SuccessSystemPayload(channel="c", extension="postgres_changes",
                                         message="Subscribed to PostgreSQL", status="ok"))
    assert link.changes_flowing and len(resyncs) == 2, "scanned again once changes flow"
    link._on_state(RealtimeSubscribeStates.CHANNEL_ERROR, None)
    assert not link.subscribed and not link.changes_flowing


async def test_a_scrape_refreshes_the_refusal_counters_from_the_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Listener.refresh_metrics (what /metrics awaits before each scrape) puts the database's
    counts into planner_refusals_total."""
    from prometheus_client import generate_latest

    from listener.app import Listener

    monkeypatch.setenv("PLANNER_DATABASE_URL", "postgresql://u:p@h/db")
    monkeypatch.setenv("SUPABASE_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "k")
    listener = Listener(ListenerSettings())  # type: ignore[call-arg]

    class Counts:
        async def refusal_counts(self) -> dict[str, int]:
            return {"runs_per_hour": 3, "teams": 0}

    listener.db = Counts()  # type: ignore[assignment]
    await listener.refresh_metrics()
    text = generate_latest().decode()
    assert 'planner_refusals_total{reason="runs_per_hour"} 3.0' in text
    assert 'planner_refusals_total{reason="teams"} 0.0' in text
