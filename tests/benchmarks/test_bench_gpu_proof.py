"""`python -m benchmarks.gpu_proof --dry-run`: the GPU proof's code path on the CPU at tiny size (issue 26 item 8)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import gpu_proof

pytestmark = pytest.mark.slow


def test_the_dry_run_measures_every_row_or_says_why_not(tmp_path, capsys):
    out = tmp_path / "proof.json"
    gpu_proof.main(["--dry-run", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["size"] == 64 and set(report["models"]) == {"tiny", "tiny-sdxl"}
    for result in report["models"].values():
        rows = result["rows"]
        assert set(rows) == {f"{backend}/{row}" for backend in ("eager_float16", "compile", "compile_cudagraphs",
                                                                "tensorrt") for row in ("1step_none", "2step_self")}
        for key in ("eager_float16/1step_none", "eager_float16/2step_self"):
            assert rows[key]["fps"] > 0 and set(rows[key]["stages_ms"]) == {"encode", "unet", "decode"}, rows[key]
        assert "CUDA graphs need CUDA" in rows["compile_cudagraphs/2step_self"]["skipped"]
        assert "CUDA GPU" in rows["tensorrt/1step_none"]["skipped"]
        # fp16 against fp32 on the same frames: close, not equal.
        assert 30 < result["fp16_vs_fp32_psnr_db"] < math.inf, result["fp16_vs_fp32_psnr_db"]
        aggregate = result["aggregate_fps"]
        assert set(aggregate) == {"4", "8"} and all(value["fps"] > 0 for value in aggregate.values()), aggregate
        assert "skipped" in result["streamdiffusion"]
    assert "tiny-sdxl: fp16 vs fp32" in capsys.readouterr().out


def test_a_spent_budget_skips_rows_and_says_so(monkeypatch):
    monkeypatch.setattr(gpu_proof.Budget, "spent", lambda self: True)
    report = gpu_proof.run(dry_run=True, frames=1)
    rows = report["models"]["tiny"]["rows"]
    assert {row["skipped"] for row in rows.values()} == {"over the time budget (--budget)"}
    assert report["models"]["tiny"]["aggregate_fps"]["8"] == {"skipped": "over the time budget (--budget)"}


def test_psnr_is_infinite_for_equal_images_and_nan_for_broken_ones():
    image = torch.rand(3, 8, 8)
    assert gpu_proof.psnr(image, image) == math.inf
    assert 0 < gpu_proof.psnr(image, (image + 0.1).clamp(0, 1)) < 30
    assert math.isnan(gpu_proof.psnr(image, torch.full_like(image, float("nan"))))


def test_without_cuda_the_real_proof_stops_saying_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the real proof would run")
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--dry-run"):
        gpu_proof.run(dry_run=False)
