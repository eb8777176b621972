"""`python -m benchmarks.resolution`: interleaved rounds of static and dynamic ONNX Runtime graphs."""

from __future__ import annotations

import json

import pytest

from benchmarks.resolution import main, spread

pytestmark = pytest.mark.slow


def test_spread_is_the_range_over_the_median():
    assert spread([9.0, 10.0, 12.0]) == pytest.approx(0.3)
    assert spread([5.0]) == 0.0


def test_rounds_of_both_rows_in_the_json(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install '.[onnx]')")
    main(["--size", "32", "--range", "32-64", "--frames", "2", "--warmup", "1", "--rounds", "2",
          "--exporter", "torchscript", "--json", str(tmp_path / "resolution.json")])
    results = json.loads((tmp_path / "resolution.json").read_text())
    assert (results["size"], results["resolution_range"], results["rounds"]) == (32, "32-64", 2)
    assert results["machine"]["torch_threads"] == results["machine"]["ort_intra_op_threads"] == 1
    for row in ("static", "dynamic"):
        assert len(results["fps"][row]["rounds"]) == 2 and results["fps"][row]["median"] > 0
    assert len(results["dynamic_vs_static"]["rounds"]) == 2
    assert "dynamic/static median" in capsys.readouterr().out
