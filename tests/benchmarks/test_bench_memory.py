"""`python -m benchmarks.memory`: a mode and `off`, each in a fresh `python -m benchmarks.memory` child."""

from __future__ import annotations

import pytest

from benchmarks.memory import format_table, run

pytestmark = pytest.mark.slow


def test_children_report_peak_memory_and_ratios_to_off():
    results = run(["slice"], model="tiny", sizes=(32,), frames=1, warmup=1, threads=1)
    assert set(results) == {"32"} and set(results["32"]) == {"off", "slice"}
    off, sliced = results["32"]["off"], results["32"]["slice"]
    for figures in (off, sliced):
        assert figures["peak_mb"] >= figures["baseline_mb"] > 0 and figures["fps"] > 0
        assert figures["activation_mb"] == pytest.approx(figures["peak_mb"] - figures["baseline_mb"], abs=0.11)
    assert sliced["peak_vs_off"] == round(sliced["peak_mb"] / off["peak_mb"], 3)
    assert sliced["fps_vs_off"] == round(sliced["fps"] / off["fps"], 3)
    assert format_table(results).splitlines()[2].split()[:2] == ["32", "slice"]
