"""The UI contract: versioned payloads, and docs/listener.md publishing their current schema."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from listener.events import (
    EVENT_VERSION,
    DoneEvent,
    Phase,
    ProgressEvent,
    ResultMetadata,
    RunStatus,
    StatusEvent,
    json_schemas,
    schema_markdown,
)
from solver import Progress

DOCS = Path(__file__).resolve().parents[2] / "docs" / "listener.md"
RUN = uuid.UUID(int=7)


def test_docs_publish_the_current_json_schema():
    text = DOCS.read_text(encoding="utf-8")
    start, end = "<!-- schema:start -->\n", "<!-- schema:end -->"
    published = text[text.index(start) + len(start):text.index(end)]
    assert published == schema_markdown(), (
        "docs/listener.md is out of date: paste `.venv/bin/python -m listener.events` "
        "between the schema markers")


def test_every_payload_carries_its_version():
    for name, schema in json_schemas().items():
        assert schema["properties"]["version"]["const"] == EVENT_VERSION, name
        assert "additionalProperties" not in schema, f"{name}: UIs must accept new fields"


def test_payloads_are_what_the_ui_receives():
    status = StatusEvent(run_id=RUN, status=RunStatus.PENDING, phase=Phase.QUEUED, position=2)
    assert (status.event, status.payload()) == ("status", {
        "version": 1, "run_id": str(RUN), "status": "PENDING", "phase": "queued",
        "position": 2, "estimated_start": None})
    progress = ProgressEvent.of(RUN, Progress(solutions=3, objective=1.5, elapsed_ms=10,
                                              time_limit_ms=2000))
    assert progress.payload()["solutions"] == 3 and progress.event == "progress"
    meta = ResultMetadata(solver_status="OPTIMAL", objective=2.0, worker_id="w", attempt=1)
    done = DoneEvent(run_id=RUN, status=RunStatus.COMPLETED, snapshot_id=RUN, result=meta)
    body = json.loads(json.dumps(done.payload()))
    assert body["result"]["objective"] == 2.0 and body["result"]["version"] == 1
    assert DoneEvent.model_validate(body) == done, "a payload reads back as its model"


def test_the_engine_cannot_send_an_undeclared_field_or_phase():
    with pytest.raises(ValidationError):
        StatusEvent.model_validate({"run_id": str(RUN), "status": "PENDING",
                                    "phase": "done"})
    with pytest.raises(ValidationError):
        ResultMetadata.model_validate({"objective": 1, "surprise": True})
