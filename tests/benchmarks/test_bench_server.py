"""`python -m benchmarks.server` runs end to end on a few frames and reports every path."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks.server import main

pytestmark = pytest.mark.slow


def test_bench_reports_engine_runtime_and_websocket_fps(capsys):
    started = time.perf_counter()
    main(["--width", "64", "--height", "64", "--frames", "3", "--warmup", "1", "--repeats", "1", "--json"])
    elapsed = time.perf_counter() - started
    result = json.loads(capsys.readouterr().out)
    # Each path times its 4 frames (warm-up frame included) within this call, so no rate can be below 4 / elapsed.
    assert min(result["engine_fps"], result["runtime_fps"], result["websocket_fps"]) >= 4 / elapsed
    assert result["ratio"] == round(result["websocket_fps"] / result["engine_fps"], 3)
    assert (result["width"], result["height"], result["frames"]) == (64, 64, 3)
