"""The protocol vocabulary shared by the server and the clients (`wire`)."""

from __future__ import annotations

import json

import pytest

import wire
from wire import (
    DroppedEvent,
    ErrorEvent,
    FrameEvent,
    Hello,
    StatsEvent,
    WireError,
    close_is_fatal,
    close_reason,
    params_message,
    parse_event,
    prompt_message,
)

EVENTS = [
    Hello(session_id="s1", width=64, height=48, max_in_flight=2, model="demo"),
    FrameEvent(seq=7, latency_ms=12.5, skipped=True),
    DroppedEvent(seq=3),
    ErrorEvent(code="bad_image", message="no", seq=4),
    ErrorEvent(code="invalid_json", message="no"),
    StatsEvent(fps=9.5, latency_ms=None, inference_ms=3.0, frames_in=5, frames_out=4, dropped=1, skipped=0,
               errors=0, in_flight=1),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: event.type)
def test_every_event_round_trips_with_its_type_first(event):
    text = event.to_json()
    assert next(iter(json.loads(text))) == "type" and json.loads(text)["type"] == event.type
    assert parse_event(text) == event


def test_unknown_event_types_are_ignored_and_unknown_fields_too():
    assert parse_event('{"type": "future_event", "x": 1}') is None
    assert parse_event('{"type": "dropped", "seq": 2, "reason": "newer"}') == DroppedEvent(seq=2)


@pytest.mark.parametrize("text", [
    "not json", "[1, 2]", '{"type":"hello","session_id":"s"}',
    '{"type":"hello","session_id":"s","width":0,"height":4,"max_in_flight":1,"model":"m"}',
    '{"type":"error","message":"no code"}', '{"type":"frame","seq":"1","latency_ms":1,"skipped":false}',
    '{"type":"frame","seq":1,"latency_ms":1,"skipped":1}', '{"type":"dropped","seq":true}',
])
def test_malformed_events_raise(text):
    with pytest.raises(WireError):
        parse_event(text)


def test_control_messages():
    assert json.loads(prompt_message("a cat")) == {"type": "prompt", "prompt": "a cat"}
    assert json.loads(prompt_message("a cat", "blurry"))["negative_prompt"] == "blurry"
    assert json.loads(params_message(guidance_scale=1.2)) == {"type": "params", "guidance_scale": 1.2}
    with pytest.raises(ValueError):
        params_message(type="prompt")


def test_only_hopeless_close_codes_stop_reconnecting():
    assert close_is_fatal(1009) and close_is_fatal(1008)
    assert not close_is_fatal(1013) and not close_is_fatal(4408) and not close_is_fatal(None)


def test_close_reason_fits_a_control_frame():
    assert close_reason("short") == "short"
    cut = close_reason("é" * 200)
    assert len(cut.encode()) <= 123 and cut.endswith("...")


def test_wire_needs_nothing_beyond_the_standard_library():
    import ast
    import sys
    from pathlib import Path

    tree = ast.parse(Path(wire.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
