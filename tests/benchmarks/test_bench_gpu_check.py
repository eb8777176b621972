"""`make gpu-check` / `python -m benchmarks.gpu_check`: the CPU branch stops at once; the steps and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_on_a_cpu_machine_it_stops_at_once_saying_why(tmp_path):
    out = tmp_path / "gpu-check.json"
    # The timeout only guards against the steps running; nothing is timed.
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "gpu-check needs a CUDA GPU" in result.stderr and "Nothing was run" in result.stderr
    assert "python -m engine.doctor" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_the_make_target_runs_the_check_into_out():
    # A dry run (-n): it prints the commands and runs none (setup would install into the environment).
    result = subprocess.run(["make", "-n", "gpu-check", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "/nonexistent-venv/bin/python -m benchmarks.gpu_check --out out/gpu-check.json" in result.stdout


def test_the_steps_are_the_doctor_the_cuda_tests_and_the_tensorrt_benchmark_at_512(tmp_path):
    doctor, tests, bench = gpu_check.steps("python", tmp_path, "stabilityai/sd-turbo")
    assert doctor.command == ["python", "-m", "engine.doctor", "--json", str(tmp_path / "gpu-check-doctor.json")]
    assert tests.command[:5] == ["python", "-m", "pytest", "-m", "cuda"]
    assert bench.command[:3] == ["python", "-m", "benchmarks.engine"]
    flags = " ".join(bench.command[3:])
    assert "--backend tensorrt" in flags and "--size 512" in flags and "--model stabilityai/sd-turbo" in flags
    assert "--device cuda" in flags and "--dtype float16" in flags


def test_sd_turbo_only_when_it_and_its_tiny_vae_load():
    assert gpu_check.bench_model({"stabilityai/sd-turbo": True, "madebyollin/taesd": True}) == "stabilityai/sd-turbo"
    assert gpu_check.bench_model({"stabilityai/sd-turbo": True, "madebyollin/taesd": False}) == "tiny"
    assert gpu_check.bench_model({}) == "tiny"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="{failures}"
skipped="{skipped}" tests="{tests}" time="1.0"></testsuite></testsuites>"""


@pytest.mark.parametrize("returncode, counts, ok", [
    (0, {"tests": 5, "failures": 0, "skipped": 1}, True),
    (1, {"tests": 5, "failures": 1, "skipped": 0}, False),
    # Every CUDA test skipped (e.g. no TensorRT): nothing was checked.
    (0, {"tests": 3, "failures": 0, "skipped": 3}, False),
])
def test_a_test_step_passes_only_when_cuda_tests_ran_and_passed(tmp_path, returncode, counts, ok):
    junit = tmp_path / "gpu-check.xml"
    junit.write_text(JUNIT.format(**counts))
    result = gpu_check.step_result(gpu_check.Step("cuda_tests", ["pytest"], junit), returncode, 12.3)
    assert result["ok"] is ok and result["counts"] == {**counts, "errors": 0}


def test_a_step_embeds_the_json_it_wrote(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"tensorrt_fps": 42.0}))
    result = gpu_check.step_result(gpu_check.Step("tensorrt_benchmark", ["bench"], bench), 0, 1.0)
    assert result["ok"] and result["results"] == {"tensorrt_fps": 42.0}
    missing = gpu_check.step_result(gpu_check.Step("doctor", ["doctor"], tmp_path / "none.json"), 1, 1.0)
    assert not missing["ok"] and "results" not in missing


def test_the_check_installs_tensorrt_for_torchs_cuda_first():
    result = subprocess.run(["make", "-n", "gpu-check", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    setup = next(line for line in result.stdout.splitlines() if "pip install" in line and "tensorrt_extra" in line)
    assert "--extra-index-url https://pypi.nvidia.com" in setup and "torch.version.cuda" in setup
    assert result.stdout.index(setup) < result.stdout.index("-m benchmarks.gpu_check")


def test_without_tensorrt_it_stops_with_the_fix_and_status_2(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "cuda_unavailable_reason", lambda: None)  # as on a CUDA machine
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert gpu_check.main(["--out", "/nonexistent/gpu-check.json"]) == 2
    err = capsys.readouterr().err
    assert "gpu-check needs TensorRT" in err and "NVIDIA's index" in err and "make gpu-setup" in err


def test_every_step_has_a_time_bound(tmp_path):
    for step in gpu_check.steps("python", tmp_path, "tiny"):
        assert 0 < step.timeout_s <= 3600, step
