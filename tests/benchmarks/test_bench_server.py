"""`python -m benchmarks.server` runs end to end on a few frames and reports every path."""

from __future__ import annotations

import json

from benchmarks.server import main


def test_bench_reports_engine_runtime_and_websocket_fps(capsys):
    main(["--width", "64", "--height", "64", "--frames", "3", "--warmup", "1", "--repeats", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["engine_fps"] > 0 and result["runtime_fps"] > 0 and result["websocket_fps"] > 0
    assert result["ratio"] == round(result["websocket_fps"] / result["engine_fps"], 3)
    assert (result["width"], result["height"], result["frames"]) == (64, 64, 3)
