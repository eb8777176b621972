"""The two-stage UNet split (CPU simulation of two devices) equals the single-device UNet and engine bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import StreamConfig, StreamEngine
from engine.backends import EagerRunner
from engine.pipeline_split import PipelineSplitRunner, PipelineSplitUNet, UNetCall
from engine.prompt import Conditioning, install_kv_processors, precompute_kv


def _call(unet, seed: int, use_kv_cache: bool, latent_size=(8, 8)) -> UNetCall:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, *latent_size, generator=generator)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    conditioning = Conditioning(states, precompute_kv(unet, states) if use_kv_cache else None)
    return UNetCall(latents, torch.tensor([999, 250 + seed]), conditioning)


def _single_device(unet, call: UNetCall) -> torch.Tensor:
    kwargs = {}
    if call.conditioning.kv_cache is not None:
        kwargs["cross_attention_kwargs"] = {"kv_cache": call.conditioning.kv_cache}
    with torch.no_grad():
        return unet(call.latents, call.timesteps, encoder_hidden_states=call.conditioning.encoder_hidden_states,
                    return_dict=False, **kwargs)[0]


@pytest.mark.parametrize("use_kv_cache", [False, True])
@pytest.mark.parametrize("latent_size", [(8, 8), (6, 10), (5, 7)])
def test_two_stages_equal_the_unet(tiny_models, use_kv_cache, latent_size):
    unet = tiny_models.unet
    install_kv_processors(unet)
    split = PipelineSplitUNet(unet)
    call = _call(unet, 0, use_kv_cache, latent_size)
    assert torch.equal(split(call.latents, call.timesteps, call.conditioning), _single_device(unet, call))


def test_each_stage_holds_only_its_own_blocks(tiny_models):
    unet = tiny_models.unet
    split = PipelineSplitUNet(unet)
    assert len(split.stage1.down_blocks) == len(unet.down_blocks) and len(split.stage1.up_blocks) == 0
    assert split.stage1.mid_block is None and split.stage1.conv_out is None
    assert len(split.stage2.down_blocks) == 0 and split.stage2.conv_in is None
    assert len(split.stage2.up_blocks) == len(unet.up_blocks)
    count = sum(parameter.numel() for parameter in unet.parameters())
    stage_counts = [sum(p.numel() for p in stage.parameters()) for stage in (split.stage1, split.stage2)]
    assert sum(stage_counts) == count and min(stage_counts) > 0
    assert len(unet.down_blocks) > 0 and unet.mid_block is not None  # the original is left whole


def test_boundary_carries_every_skip_connection(tiny_models):
    unet = tiny_models.unet
    split = PipelineSplitUNet(unet)
    boundary = split.run_stage1(_call(unet, 1, use_kv_cache=False))
    assert len(boundary.skips) == sum(len(block.resnets) for block in unet.up_blocks)


def test_pipelined_micro_batches_equal_single_device_calls(tiny_models):
    unet = tiny_models.unet
    install_kv_processors(unet)
    split = PipelineSplitUNet(unet)
    calls = [_call(unet, seed, use_kv_cache=True) for seed in range(5)]
    outputs = split.run_pipelined(calls)
    assert len(outputs) == len(calls)
    for call, output in zip(calls, outputs, strict=True):
        assert torch.equal(output, _single_device(unet, call))


def test_a_failing_stage_is_reported(tiny_models):
    split = PipelineSplitUNet(tiny_models.unet)
    good = _call(tiny_models.unet, 0, use_kv_cache=False)
    bad = UNetCall(torch.zeros(2, 3, 8, 8), good.timesteps, good.conditioning)  # wrong channel count
    with pytest.raises(RuntimeError, match="stage 1 failed"):
        split.run_pipelined([good, bad, good])


def test_engine_with_the_split_runner_equals_the_single_device_engine(tiny_models, tiny_engine, with_runner):
    config = StreamConfig(width=64, height=64, similarity_filter=False)
    frames = torch.from_numpy(np.stack(synthetic_clip("slow_pan", 4, 64, 64, seed=0))).permute(0, 3, 1, 2).float() / 255
    single = StreamEngine(with_runner(tiny_engine, EagerRunner(tiny_models)), config)
    runner = PipelineSplitRunner(tiny_models)
    split = StreamEngine(with_runner(tiny_engine, runner), config)
    for frame in frames:
        assert torch.equal(split.step(frame).images, single.step(frame).images)
    assert runner._split is not None  # the engine's UNet calls did go through the two stages
