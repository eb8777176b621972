"""The whole engine on ONNX Runtime equals the eager engine."""

from __future__ import annotations

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.backends import make_runner
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.codec import decode_image, encode_jpeg
from engine.runtime import FrameResult, StreamRuntime

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4


def _frames(count: int, size: int) -> list[torch.Tensor]:
    return [torch.from_numpy(frame).permute(2, 0, 1).float() / 255
            for frame in synthetic_clip("slow_pan", count, size, size, seed=3)]


ONNX = LoadConfig(model="tiny", device="cpu", backend="onnxruntime")


@pytest.fixture(scope="module")
def config():
    return StreamConfig(width=64, height=64, cfg_type="self", similarity_filter=False)


@pytest.fixture(scope="module")
def onnx_engine(tiny_models):
    """The tiny models loaded with `backend="onnxruntime"`."""
    return Engine.prepare(tiny_models, ONNX)


def test_engine_on_onnxruntime_equals_eager_over_ten_frames(tiny_engine, onnx_engine, config):
    eager = StreamEngine(tiny_engine, config)
    compiled = StreamEngine(onnx_engine, config)
    assert isinstance(compiled.runner, OnnxRuntimeRunner)
    worst = 0.0
    for frame in _frames(10, 64):
        expected, actual = eager(frame), compiled(frame)
        assert actual.shape == expected.shape == (3, 64, 64)
        worst = max(worst, (actual - expected).abs().max().item())
    assert worst < TOLERANCE


def test_prompt_change_reaches_the_compiled_unet(tiny_engine, onnx_engine, config):
    eager = StreamEngine(tiny_engine, config)
    unchanged = StreamEngine(tiny_engine, config)
    compiled = StreamEngine(onnx_engine, config)
    frames = _frames(4, 64)
    for frame in frames[:3]:
        eager(frame), unchanged(frame), compiled(frame)
    for engine in (eager, compiled):
        engine.update_prompt("a pencil sketch of a lighthouse")
    expected, actual = eager(frames[3]), compiled(frames[3])
    assert (actual - expected).abs().max().item() < TOLERANCE
    # The tiny random model barely listens to its prompt, but measurably more than the tolerance.
    assert (actual - unchanged(frames[3])).abs().max().item() > 2 * TOLERANCE


def test_streams_share_one_runner_per_models_and_mode(tiny_models, onnx_engine, config):
    first, second = StreamEngine(onnx_engine, config), StreamEngine(onnx_engine, config)
    assert first.runner is second.runner
    assert make_runner(tiny_models, ONNX, config) is first.runner


def test_runtime_streams_run_on_one_shared_onnxruntime_runner(onnx_engine, config):
    runtime = StreamRuntime(onnx_engine, config)
    try:
        first, second = runtime.open_stream(), runtime.open_stream()
        assert isinstance(first.engine.runner, OnnxRuntimeRunner)
        assert first.engine.runner is second.engine.runner
        for index, frame in enumerate(synthetic_clip("fast_motion", 3, 64, 64, seed=1)):
            for handle in (first, second):
                assert handle.put(encode_jpeg(frame)) == index
                result = handle.get(timeout=60)
                assert isinstance(result, FrameResult) and result.error is None
                assert decode_image(result.jpeg, 64, 64).shape == (64, 64, 3)
        assert runtime.status().inference_errors == 0
    finally:
        runtime.close()
