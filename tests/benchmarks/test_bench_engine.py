"""`python -m benchmarks.engine`: every row and ratio on the tiny models (SD and SDXL architectures), a few frames."""

from __future__ import annotations

import json
import time

import pytest
import torch

from benchmarks.engine import main
from engine.backends import onnxruntime as ort_backend

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_rows_and_ratios_in_the_json(tmp_path, capsys, model):
    started = time.perf_counter()
    main(["--model", model, "--size", "32", "--frames", "2", "--warmup", "1", "--json", str(tmp_path / "bench.json")])
    elapsed = time.perf_counter() - started
    results = json.loads((tmp_path / "bench.json").read_text())
    rows = ("engine_fps", "compute_limit_fps", "sequential_fps", "full_cfg_fps", "diffusers_fps")
    assert set(results) == {"model", "size", "width", "height", "frames", "t_index_list", "machine", "ratios", *rows,
                            "ssf_static_skip_rate", "threads"}
    assert all(results["threads"][row] == {"torch": 1} for row in rows)
    assert (results["model"], results["size"], results["frames"]) == (model, 32, 2)
    assert (results["width"], results["height"]) == (32, 32)
    # A median frame lasts less than the whole run.
    assert all(results[row] > 1 / elapsed for row in rows)
    # 100 identical frames: the filter skips at most 10 in a row, and computes one frame between runs.
    assert 0.5 < results["ssf_static_skip_rate"] <= 10 / 11
    engine = results["engine_fps"]
    assert results["ratios"] == {
        "engine_vs_compute_limit": round(engine / results["compute_limit_fps"], 3),
        "engine_vs_diffusers": round(engine / results["diffusers_fps"], 3),
        "engine_vs_sequential": round(engine / results["sequential_fps"], 3),
        "engine_vs_full_cfg": round(engine / results["full_cfg_fps"], 3),
    }
    assert "engine_vs_diffusers" in capsys.readouterr().out


def test_backend_rows_report_both_thread_counts_and_what_auto_chose(tmp_path, monkeypatch, capsys):
    """ONNX Runtime's row runs with torch at 1 thread and ONNX Runtime at the budget; the next row starts from the
    budget again; `auto` names the backend it chose."""
    monkeypatch.setenv("STREAMDIFF_TRT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(ort_backend, "_claimed_threads", None)
    monkeypatch.delenv("ORT_INTRA_OP_THREADS", raising=False)
    torch.set_num_threads(2)
    main(["--size", "32", "--frames", "2", "--warmup", "1", "--backend", "onnxruntime", "auto",
          "--json", str(tmp_path / "bench.json")])
    results = json.loads((tmp_path / "bench.json").read_text())
    onnx = results["threads"]["onnxruntime_fps"]
    assert onnx["torch"] == 1 and onnx["onnxruntime"]["intra_op_num_threads"] == 2
    assert onnx["onnxruntime"]["config_entries"] == {"session.intra_op.allow_spinning": "0",
                                                     "session.inter_op.allow_spinning": "0"}
    assert results["threads"]["engine_fps"] == {"torch": 2}
    assert results["auto_backend"] in ("eager", "onnxruntime") and results["auto_fps"] > 0
    assert torch.get_num_threads() == 2
    out = capsys.readouterr().out
    assert "ONNX Runtime 2 intra-op" in out and f"({results['auto_backend']})" in out


def test_controlnet_rows_report_cost_reuse_and_quality(tmp_path, capsys):
    out = tmp_path / "controlnet.json"
    main(["--controlnet", "random", "--size", "32", "--frames", "3", "--warmup", "1", "--json", str(out)])
    results = json.loads(out.read_text())
    for key in ("engine_fps", "controlnet_fps", "controlnet_reuse_fps"):
        assert results[key] > 0
    rows = results["controlnet"]
    assert rows["control_preprocess_ms"] > 0 and rows["engine_fps"] > 0
    assert rows["controlnet_reuse_interval"] == 4 and rows["controlnet_reuse_psnr_db"] > 20
    assert {"controlnet_vs_engine", "controlnet_reuse_vs_engine", "engine_vs_diffusers"} <= set(results["ratios"])
    assert "controlnet_reuse_vs_engine" in capsys.readouterr().out
