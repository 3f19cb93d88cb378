"""The JSON-lines progress protocol."""

import io
import json

import pytest

from engine_tools.progress import Cancelled, JsonLinesProgress, SilentProgress, validate_event


def test_jsonl_events_follow_schema_and_spans_map_fractions():
    stream = io.StringIO()
    progress = JsonLinesProgress(stream)
    progress.update("download", 0.5, "half")
    with progress.span(0.5, 1.0):
        progress.update("build", 0.5, "inner half")
    progress.warning("skipped a file")
    progress.result({"ok": True})
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    for event in events:
        validate_event(event)
    assert [e["event"] for e in events] == ["progress", "progress", "log", "result"]
    assert events[0]["fraction"] == 0.5
    assert events[1]["fraction"] == pytest.approx(0.75)
    assert events[2]["level"] == "warning"


def test_validate_event_rejects_bad_events():
    with pytest.raises(ValueError):
        validate_event({"event": "progress", "stage": "x", "fraction": 2.0, "message": "", "elapsed": 0})
    with pytest.raises(ValueError):
        validate_event({"event": "nonsense"})


def test_cancel_is_raised_at_next_update():
    progress = SilentProgress()
    progress.should_cancel = lambda: True
    with pytest.raises(Cancelled):
        progress.update("calibrate", 0.1)
