"""`python -m engine.doctor`: the pure decisions alone, then the whole command on this (CPU) machine."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from engine import doctor
from engine.backends.cache import CacheKeyParts, engine_cache_key, write_digest, write_key_parts
from engine.backends.errors import BackendUnavailableError
from engine.backends.factory import Availability
from engine.backends.onnxruntime import onnxruntime_available
from engine.backends.tensorrt import tensorrt_unavailable_reason
from engine.models import ModelLoadError

CPU_VERSIONS = {"torch": "2.13.0+cpu", "torch_cuda": None, "cuda_available": False, "cudnn": None, "tensorrt": None,
                "polygraphy": None, "onnx": "1.23.2", "onnxscript": "0.7.2", "onnxruntime": "1.32.0",
                "onnxruntime_providers": ["CPUExecutionProvider"], "diffusers": "0.42.1"}
NO_GPU = "the tensorrt backend needs a CUDA GPU and torch sees none"
GPU = {"index": 0, "name": "NVIDIA GeForce RTX 4090", "capability": "8.9", "total_gib": 23.6, "free_gib": 22.9}


def _checks(versions, available, gpus=()):
    return {check.name: check for check in doctor.environment_checks(versions, list(gpus), available)}


# ---------------------------------------------------------------------------------------------- pure decisions


def test_a_cpu_machine_is_told_what_a_gpu_needs():
    checks = _checks(CPU_VERSIONS, Availability("cpu", NO_GPU, ("CPUExecutionProvider",)))
    assert checks["torch"].status == "ok" and "CPU only" in checks["torch"].detail
    assert checks["CUDA"].status == "missing" and "download.pytorch.org/whl/cu" in checks["CUDA"].fix
    assert checks["TensorRT"].status == "missing"
    assert checks["TensorRT"].fix.startswith("on a CUDA machine: the extra that matches your torch's CUDA")
    assert "--extra-index-url https://pypi.nvidia.com -e '.[trt]'" in checks["TensorRT"].fix
    assert checks["ONNX Runtime"].status == "ok" and "CPUExecutionProvider" in checks["ONNX Runtime"].detail
    assert checks["ONNX export"].status == checks["diffusers"].status == "ok"


def test_each_missing_piece_of_a_gpu_machine_names_its_fix():
    versions = {**CPU_VERSIONS, "torch": "2.13.0+cu130", "torch_cuda": "13.0", "cuda_available": True,
                "cudnn": 91300, "tensorrt": "10.13.0", "onnxruntime": None, "onnxruntime_providers": None,
                "onnxscript": None}
    broken = "the tensorrt package is installed but does not import (OSError: libnvinfer.so.10)"
    checks = _checks(versions, Availability("cuda", broken, None, "ModuleNotFoundError: onnxruntime", "float16"),
                     [GPU])
    assert checks["CUDA"].status == "ok" and "RTX 4090 (23.6 GiB)" in checks["CUDA"].detail
    assert checks["cuDNN"].status == "ok"
    assert "--force-reinstall --extra-index-url https://pypi.nvidia.com -e '.[trt-cu13]'" in checks["TensorRT"].fix
    assert "NGC" in checks["TensorRT"].fix and "stubs" in checks["TensorRT"].fix
    assert checks["ONNX Runtime"].fix == checks["ONNX export"].fix == "pip install -e '.[onnx]'"


def test_a_cuda_torch_without_a_gpu_points_at_the_driver():
    versions = {**CPU_VERSIONS, "torch_cuda": "12.8"}
    assert "nvidia-smi" in _checks(versions, Availability("cpu", NO_GPU, ("CPUExecutionProvider",)))["CUDA"].fix


def test_a_cpu_only_onnxruntime_beside_cuda_models_names_onnxruntime_gpu():
    versions = {**CPU_VERSIONS, "torch_cuda": "12.8", "cuda_available": True, "cudnn": 91000}
    checks = _checks(versions, Availability("cuda", None, ("CPUExecutionProvider",), dtype="float16"), [GPU])
    assert checks["ONNX Runtime"].status == "missing" and "onnxruntime-gpu" in checks["ONNX Runtime"].fix
    assert checks["TensorRT"].status == "ok"


PARTS = CacheKeyParts(network="unet", model_hash="ab" * 32, width=512, height=512, batch=2, cfg_type="self",
                      dtype="float16", kv_cache=True, exporter="dynamo", opset=18, tensorrt_version="10.13.0",
                      gpu_name=GPU["name"], sequence_length=77)


@pytest.mark.parametrize("parts, name, problem, expected", [
    (PARTS, f"{engine_cache_key(PARTS)}.engine", None, ("ok", "")),
    (PARTS, f"{engine_cache_key(PARTS)}.engine", "does not match its recorded SHA-256", ("unreadable", "SHA-256")),
    (None, "unet-512x512-b2-self-float16-0123456789abcdef0123.engine", None, ("unknown", "no key parts")),
    (PARTS, "unet-512x512-b2-self-float16-0123456789abcdef0123.engine", None, ("stale", "key changed")),
    (dataclasses.replace(PARTS, tensorrt_version="10.3.0"), None, None, ("stale", "TensorRT 10.3.0")),
    (dataclasses.replace(PARTS, gpu_name="NVIDIA A100"), None, None, ("stale", "built for NVIDIA A100")),
    # An ONNX graph runs on any GPU and TensorRT version.
    (dataclasses.replace(PARTS, gpu_name="any", tensorrt_version="none"), ".onnx", None, ("ok", "")),
])
def test_entry_status(parts, name, problem, expected):
    if name is None or name == ".onnx":
        name = f"{engine_cache_key(parts)}{name or '.engine'}"
    status, note = doctor.entry_status(name, parts, problem, "10.13.0", [GPU["name"]])
    assert status == expected[0] and expected[1] in note


@pytest.mark.parametrize("backend, error, needles", [
    ("onnxruntime", ModelLoadError("could not fetch"), ["--model tiny"]),
    ("onnxruntime", BackendUnavailableError("needs onnxruntime"), ["pip install -e '.[onnx]'", "--backend eager"]),
    ("onnxruntime", RuntimeError("session failed"), ["--force-reinstall -e '.[onnx]'", "--backend eager"]),
    ("tensorrt", BackendUnavailableError("needs CUDA"), ["-e '.[trt]'", "NVIDIA's index"]),
    ("eager", RuntimeError("boom"), ["pip install --force-reinstall -e ."]),
])
def test_a_failed_path_names_its_fix(backend, error, needles):
    fix = doctor.failure_fix(backend, error, Availability("cpu", NO_GPU, ("CPUExecutionProvider",)), None)
    assert all(needle in fix for needle in needles)


def test_exit_code_is_zero_only_for_frames_that_ran():
    assert doctor.exit_code({"ok": True}) == 0
    assert doctor.exit_code({"ok": False}) == doctor.exit_code(None) == 1


def test_moving_frames_differ_and_lie_in_the_unit_range():
    frames = doctor.moving_frames(3, 16)
    assert all(frame.shape == (3, 16, 16) and 0 <= frame.min() and frame.max() <= 1 for frame in frames)
    assert not torch.equal(frames[0], frames[1])


# ---------------------------------------------------------------------------------------------- the cache


def test_the_cache_scan_reads_key_parts_and_finds_stale_and_damaged_entries(tmp_path):
    onnx_parts = dataclasses.replace(PARTS, tensorrt_version="none", gpu_name="any")
    graph = tmp_path / f"{engine_cache_key(onnx_parts)}.onnx"
    graph.write_bytes(b"\x00not an onnx graph")
    write_key_parts(graph, onnx_parts)
    engine = tmp_path / f"{engine_cache_key(PARTS)}.engine"
    engine.write_bytes(b"engine")
    write_digest(engine)
    write_key_parts(engine, PARTS)
    damaged_parts = dataclasses.replace(PARTS, batch=3)
    damaged = tmp_path / f"{engine_cache_key(damaged_parts)}.engine"
    damaged.write_bytes(b"engine")
    write_digest(damaged)
    damaged.write_bytes(b"engin")
    write_key_parts(damaged, damaged_parts)
    (tmp_path / "unet-64x64-b2-self-float32-00000000000000000000.onnx.data").write_bytes(b"weights")
    (tmp_path / ".unet.onnx.abc123.partial").mkdir()
    (tmp_path / ".unet.onnx.abc123.partial" / "unet.onnx").write_bytes(b"half")
    (tmp_path / "timing-NVIDIA_GeForce_RTX_4090-trt10.13.0.cache").write_bytes(b"timings")
    (tmp_path / ".gitkeep").write_bytes(b"")

    entries = {entry.name: entry for entry in doctor.scan_cache(tmp_path, "10.13.0", [GPU["name"]])}
    assert entries[engine.name].status == "ok" and entries[engine.name].parts["batch"] == 2
    assert entries[engine.name].bytes == sum(path.stat().st_size for path in tmp_path.glob(engine.name + "*"))
    assert entries[graph.name].status == "unreadable" and "not a valid ONNX graph" in entries[graph.name].note
    assert entries[graph.name].fix == f"rm '{graph}'*"
    assert entries[damaged.name].status == "unreadable" and "SHA-256" in entries[damaged.name].note
    assert entries["unet-64x64-b2-self-float32-00000000000000000000.onnx.data"].kind == "orphan"
    assert entries[".unet.onnx.abc123.partial"].kind == "leftover"
    assert entries["timing-NVIDIA_GeForce_RTX_4090-trt10.13.0.cache"].kind == "timing cache"
    assert ".gitkeep" not in entries
    # Another machine: the same engine is stale there.
    elsewhere = {entry.name: entry for entry in doctor.scan_cache(tmp_path, "none", [])}
    assert elsewhere[engine.name].status == "stale"


# ---------------------------------------------------------------------------------------------- the command


def _run(tmp_path, capsys, *extra):
    code = doctor.main(["--size", "64", "--frames", "3", "--warmup", "1", "--exporter", "torchscript",
                        "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "report.json"), *extra])
    return code, capsys.readouterr().out, json.loads((tmp_path / "report.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the CPU report does not apply")
def test_the_doctor_on_a_cpu_machine_picks_a_backend_runs_frames_and_exits_0(tmp_path, capsys):
    code, out, report = _run(tmp_path, capsys)
    expected = "onnxruntime" if onnxruntime_available() else "eager"
    assert code == 0 and report["exit_code"] == 0
    assert "torch sees no CUDA GPU" in out and "GPUs                   none" in out
    assert f"--backend auto -> {expected}" in out
    assert f"result: the {expected} path works here (exit 0)" in out
    assert report["run"]["backend"] == expected and report["run"]["fps"] > 0 and report["run"]["ok"]
    assert report["versions"]["torch"] == torch.__version__ and report["gpus"] == []
    assert report["backend"]["available"]["tensorrt"] == tensorrt_unavailable_reason()
    if expected == "onnxruntime":
        # The run exported three graphs; the report lists them with the key parts they recorded.
        graphs = [entry for entry in report["cache"]["entries"] if entry["kind"] == "onnx"]
        assert len(graphs) == 3 and all(entry["status"] == "ok" and entry["parts"] for entry in graphs)
        code, out, report = _run(tmp_path, capsys)
        assert code == 0 and "unet 64x64 batch 2 self float32 K/V inputs, torchscript opset 17" in out


def test_the_doctor_lists_what_auto_measured_here(tmp_path, capsys):
    from engine.backends.auto import CalibrationKey, Measurement, write_verdict

    key = CalibrationKey("model", 256, 256, "self", 2, 1, "float32", "cpu", torch.__version__, "1.32.0", 2, 2, True,
                         0.0)
    write_verdict(tmp_path / "cache", key, (Measurement("eager", 30.0, 0.1), Measurement("onnxruntime", 45.0, 4.0)),
                  "onnxruntime")
    report = doctor.diagnose(doctor.parse_args(["--cache-dir", str(tmp_path / "cache"), "--backend", "eager",
                                                "--frames", "1", "--warmup", "0", "--size", "32"]))
    (verdict,) = report.backend["auto_verdicts"]
    assert (verdict["size"], verdict["chosen"], verdict["threads"]) == ("256x256", "onnxruntime", 2)
    out = doctor.format_report(report)
    assert "256x256 self float32 on cpu, 2 thread(s) -> onnxruntime: eager 30.0 fps" in out


def test_a_failing_backend_exits_non_zero_with_its_fix(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install '.[onnx]')")
    from engine.backends import onnxruntime as ort_backend

    def broken(self, inputs, output_shape):
        raise RuntimeError("ONNX Runtime session failed")

    monkeypatch.setattr(ort_backend.OnnxRuntimeSession, "run", broken)
    code, out, report = _run(tmp_path, capsys, "--backend", "onnxruntime")
    assert code == 1 and report["exit_code"] == 1 and report["run"] is None
    assert "FAILED on onnxruntime: RuntimeError: ONNX Runtime session failed" in out
    assert "fix: pip install --force-reinstall -e '.[onnx]'" in out and "--backend eager" in out
    assert "result: the onnxruntime path does NOT work here (exit 1)" in out
    assert report["failure"]["fix"] in report["fixes"]


def test_without_onnxruntime_auto_runs_eager_and_names_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "probe_availability",
                        lambda device, dtype: Availability(device.type, NO_GPU, None, "ModuleNotFoundError", dtype))
    code, out, report = _run(tmp_path, capsys, "--device", "cpu")
    assert code == 0 and report["run"]["backend"] == "eager"
    assert "--backend auto -> eager" in out and "fix: pip install -e '.[onnx]'" in out


@pytest.mark.skipif(tensorrt_unavailable_reason() is None, reason="TensorRT runs here")
def test_asking_for_tensorrt_where_it_cannot_run_exits_1_naming_the_install(tmp_path, capsys):
    code, out, report = _run(tmp_path, capsys, "--backend", "tensorrt", "--device", "cpu")
    assert code == 1 and "FAILED on tensorrt: BackendUnavailableError" in out
    assert "-e '.[trt]'" in report["failure"]["fix"] and "NVIDIA's index" in report["failure"]["fix"]


@pytest.mark.cuda
@pytest.mark.skipif(tensorrt_unavailable_reason() is not None,
                    reason=f"TensorRT cannot run here: {tensorrt_unavailable_reason()}")
def test_the_doctor_on_a_gpu_machine_picks_tensorrt_and_runs_frames(tmp_path, capsys):
    code, out, report = _run(tmp_path, capsys)
    assert code == 0 and report["run"]["backend"] == "tensorrt" and report["run"]["device"].startswith("cuda")
    assert report["gpus"] and "--backend auto -> tensorrt" in out
    engines = [entry for entry in report["cache"]["entries"] if entry["kind"] == "engine"]
    assert len(engines) == 3 and all(entry["status"] == "ok" for entry in engines)
