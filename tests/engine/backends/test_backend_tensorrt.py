"""TensorRT: a clear error where it cannot run; build, load and run where CUDA and tensorrt exist."""

from __future__ import annotations

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import EngineConfig, StreamEngine, load_models
from engine.backends import BackendUnavailableError, make_runner
from engine.backends.tensorrt import TensorRTRunner, tensorrt_unavailable_reason
from engine.build import main as build_main

UNAVAILABLE = tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"TensorRT cannot run here: {UNAVAILABLE}")


@pytest.mark.skipif(UNAVAILABLE is None, reason="CUDA and TensorRT are present: the backend runs")
def test_tensorrt_without_cuda_or_package_fails_clearly(tiny_models):
    config = EngineConfig(width=64, height=64, backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match="tensorrt backend needs") as error:
        make_runner(tiny_models, config)
    assert "onnxruntime" in str(error.value)
    with pytest.raises(BackendUnavailableError, match="tensorrt backend needs"):
        StreamEngine(tiny_models, config)
    with pytest.raises(BackendUnavailableError):
        TensorRTRunner(tiny_models)


@pytest.mark.skipif(UNAVAILABLE is None, reason="CUDA and TensorRT are present: the backend runs")
def test_build_cli_reports_tensorrt_unavailable(tmp_path, capsys):
    code = build_main(["--width", "64", "--height", "64", "--backend", "tensorrt", "--cache-dir", str(tmp_path)])
    assert code == 2
    assert "tensorrt backend needs" in capsys.readouterr().err


def _frames(count: int) -> list[torch.Tensor]:
    return [torch.from_numpy(frame).permute(2, 0, 1).float() / 255
            for frame in synthetic_clip("slow_pan", count, 64, 64, seed=3)]


@pytest.fixture(scope="module")
def cuda_models():
    return load_models("tiny").to(torch.device("cuda"), torch.float16)


@pytest.mark.cuda
@needs_tensorrt
def test_tensorrt_engine_builds_loads_and_follows_eager(cuda_models, tmp_path):
    config = EngineConfig(width=64, height=64, similarity_filter=False, device="cuda", dtype="float16")
    runner = TensorRTRunner(cuda_models, config.cfg_type, tmp_path)
    paths = runner.prepare(config)
    assert all(path.suffix == ".engine" and path.is_file() for path in paths)
    assert (tmp_path / runner.timing_cache.name).is_file()
    eager = StreamEngine(cuda_models, config)
    compiled = StreamEngine(cuda_models, config, runner=runner)
    for frame in _frames(5):
        expected, actual = eager(frame), compiled(frame)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        # fp16 engines against fp16 PyTorch: close, not bit-equal.
        assert (actual.float() - expected.float()).abs().max().item() < 5e-2


@pytest.mark.cuda
@needs_tensorrt
def test_tensorrt_buffers_are_allocated_once(cuda_models, tmp_path):
    config = EngineConfig(width=64, height=64, similarity_filter=False, device="cuda", dtype="float16")
    runner = TensorRTRunner(cuda_models, config.cfg_type, tmp_path)
    runner.prepare(config)
    engine = StreamEngine(cuda_models, config, runner=runner)
    engine(_frames(1)[0])
    graphs = list(runner._graphs.values())
    addresses = [{name: buffer.data_ptr() for name, buffer in graph.buffers.items()} for graph in graphs]
    for frame in _frames(3):
        engine(frame)
    assert [{name: buffer.data_ptr() for name, buffer in graph.buffers.items()} for graph in graphs] == addresses
    reloaded = TensorRTRunner(cuda_models, config.cfg_type, tmp_path)
    mtimes = {path: path.stat().st_mtime_ns for path in reloaded.prepare(config)}
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in mtimes.items())
