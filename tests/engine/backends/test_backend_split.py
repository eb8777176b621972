"""`vae_backend`: an eager UNet (which batches sessions) beside ONNX Runtime VAE graphs."""

from __future__ import annotations

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.backends import EagerRunner, make_runner
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.backends.split import SplitRunner
from engine.batching import batch_key, step_batch

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4


def _frames(count: int, size: int, seed: int = 3) -> list[torch.Tensor]:
    return [torch.from_numpy(frame).permute(2, 0, 1).float() / 255
            for frame in synthetic_clip("slow_pan", count, size, size, seed=seed)]


LOAD = LoadConfig(model="tiny", device="cpu", backend="eager")
SPLIT = LOAD.replace(vae_backend="onnxruntime")


@pytest.fixture(scope="module")
def config():
    return StreamConfig(width=64, height=64, cfg_type="self", similarity_filter=False)


@pytest.fixture(scope="module")
def split_engine(tiny_models):
    """The tiny models loaded with an eager UNet and the VAE on ONNX Runtime."""
    return Engine.prepare(tiny_models, SPLIT)


def test_split_engine_runs_the_unet_eagerly_and_the_vae_on_onnxruntime(tiny_engine, split_engine, config):
    engine = StreamEngine(split_engine, config)
    runner = engine.runner
    assert isinstance(runner, SplitRunner) and runner.capabilities.name == "eager+onnxruntime"
    assert isinstance(runner.unet_runner, EagerRunner) and isinstance(runner.vae_runner, OnnxRuntimeRunner)
    # Only the VAE graphs were opened: the UNet never goes through ONNX Runtime.
    assert {shape.network for shape in runner.vae_runner._graphs} == {"vae_encoder", "vae_decoder"}
    eager = StreamEngine(tiny_engine, config)
    worst = 0.0
    for frame in _frames(8, 64):
        expected, actual = eager(frame), engine(frame)
        worst = max(worst, (actual - expected).abs().max().item())
    assert 0 < worst < TOLERANCE  # the VAE really ran elsewhere (not bit-identical) and agrees


def test_split_runner_is_shared_and_sessions_still_batch(tiny_models, split_engine, config):
    first = StreamEngine(split_engine, config)
    second = StreamEngine(split_engine, config.replace(prompt="a neon city", seed=7))
    assert first.runner is second.runner is make_runner(tiny_models, SPLIT, config)
    assert batch_key(first) is not None and batch_key(first) == batch_key(second)
    alone = [StreamEngine(split_engine, config),
             StreamEngine(split_engine, config.replace(prompt="a neon city", seed=7))]
    calls = []
    unet = first.runner.unet_runner.unet

    def counting_unet(latents, timesteps, conditioning):
        calls.append(latents.shape[0])
        return unet(latents, timesteps, conditioning)

    first.runner.unet_runner.unet = counting_unet
    try:
        for a, b in zip(_frames(4, 64), _frames(4, 64, seed=5), strict=True):
            calls.clear()
            batched = step_batch([first, second], [a, b])
            batched_calls = list(calls)
            expected = [alone[0](a), alone[1](b)]
            for result, image in zip(batched, expected, strict=True):
                assert (result.images - image).abs().max().item() < 1e-5
    finally:
        del first.runner.unet_runner.unet
    # After each stream's priming call, one UNet call carries both sessions' rows (2 slots each).
    assert batched_calls == [4]


def test_skip_policies_accept_an_eager_unet_with_another_vae(tiny_models, split_engine, config):
    engine = StreamEngine(split_engine, config.replace(skip_policy="rehash"))
    assert engine.skip_policy is not None
    engine(_frames(1, 64)[0])
    onnx_unet = Engine.prepare(tiny_models, LOAD.replace(backend="onnxruntime", vae_backend="eager"))
    with pytest.raises(ValueError, match="needs the eager backend"):
        StreamEngine(onnx_unet, config.replace(skip_policy="rehash"))


def test_vae_backend_validation():
    with pytest.raises(ValueError, match="`vae_backend`"):
        LoadConfig(vae_backend="cuda")
    with pytest.raises(ValueError, match="`memory`"):
        LoadConfig(memory="slice", vae_backend="onnxruntime")
    assert LoadConfig(memory="slice", vae_backend="eager").vae_backend == "eager"
