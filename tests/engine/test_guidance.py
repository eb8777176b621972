"""Guidance modes: UNet batch sizes counted with a forward hook, and RCFG formulas on known tensors."""

from __future__ import annotations

import pytest
import torch

from engine import StreamConfig, StreamEngine, guidance
from engine.schedule import SlotSchedule, predict_x0


def count_unet_batches(engine, config, frames=3):
    seen = []
    hook = engine.models.unet.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    try:
        stream = StreamEngine(engine, config)
        for _ in range(frames):
            stream(torch.rand(config.frame_buffer_size, 3, config.height, config.width))
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("cfg_type,slots_per_step", [("none", 0), ("self", 0), ("initialize", 1), ("full", 4)])
@pytest.mark.parametrize("frame_buffer_size", [1, 2])
def test_unet_batch_size_per_mode(tiny_engine, cfg_type, slots_per_step, frame_buffer_size):
    n = 4
    config = StreamConfig(width=32, height=32, t_index_list=(0, 16, 32, 45), cfg_type=cfg_type,
                          frame_buffer_size=frame_buffer_size, similarity_filter=False)
    expected = (n + slots_per_step) * frame_buffer_size
    assert guidance.unet_batch_size(cfg_type, n, frame_buffer_size) == expected
    batches = count_unet_batches(tiny_engine, config)
    # n − 1 priming calls on the first frame, then one call per frame, all at the same batch size.
    assert batches == [expected] * (n - 1 + 3)


def known_schedule() -> SlotSchedule:
    column = lambda *values: torch.tensor(values).view(-1, 1, 1, 1)  # noqa: E731
    return SlotSchedule(timesteps=torch.tensor([900, 500]), alpha=column(0.5, 0.8), beta=column(0.75, 0.6),
                        c_skip=column(0.1, 0.2), c_out=column(0.9, 0.8), frames_per_slot=1)


def test_guide_formulas_on_known_tensors():
    cond, uncond, stock = torch.full((2, 1, 1, 1), 2.0), torch.full((2, 1, 1, 1), 1.0), torch.full((2, 1, 1, 1), 0.5)
    eps, _ = guidance.guide("full", torch.cat([uncond, cond]), None, 3.0, 1.0, 1)
    assert torch.allclose(eps, uncond + 3.0 * (cond - uncond))
    eps, new_stock = guidance.guide("self", cond, stock, 3.0, 0.4, 1)
    assert torch.allclose(eps, 0.4 * stock + 3.0 * (cond - 0.4 * stock))
    assert new_stock is stock
    newest_uncond = torch.full((1, 1, 1, 1), -1.0)
    eps, new_stock = guidance.guide("initialize", torch.cat([newest_uncond, cond]), stock, 3.0, 0.4, 1)
    assert new_stock[0].item() == -1.0 and new_stock[1].item() == 0.5
    assert torch.allclose(eps, 0.4 * new_stock + 3.0 * (cond - 0.4 * new_stock))
    eps, _ = guidance.guide("none", cond, None, 3.0, 0.4, 1)
    assert torch.equal(eps, cond)


def test_stock_noise_update_on_known_tensors():
    schedule = known_schedule()
    eps = torch.tensor([1.0, 2.0]).view(-1, 1, 1, 1)
    stock = torch.tensor([0.5, 0.25]).view(-1, 1, 1, 1)
    fixed = torch.tensor([0.3, -0.7]).view(-1, 1, 1, 1)
    # Δx_0 = (c_out·(β·stock − β·ε)/α + c_skip·β·stock)·α_1/β_1 for slot 0 → slot 1.
    delta_x = (0.9 * (0.75 * 0.5 - 0.75 * 1.0) / 0.5 + 0.1 * 0.75 * 0.5) * 0.8 / 0.6
    new_stock = guidance.next_stock_noise(eps, stock, fixed, schedule)
    assert new_stock[0].item() == pytest.approx(0.3)
    assert new_stock[1].item() == pytest.approx(-0.7 + delta_x)


def test_predict_x0_formula():
    schedule = known_schedule()
    x_t = torch.tensor([1.0, -1.0]).view(-1, 1, 1, 1)
    eps = torch.tensor([0.2, 0.4]).view(-1, 1, 1, 1)
    x0 = predict_x0(x_t, eps, schedule)
    assert x0[0].item() == pytest.approx(0.9 * (1.0 - 0.75 * 0.2) / 0.5 + 0.1 * 1.0)
    assert x0[1].item() == pytest.approx(0.8 * (-1.0 - 0.6 * 0.4) / 0.8 + 0.2 * -1.0)


def test_prompt_embeds_layout_matches_unet_inputs():
    cond, uncond = torch.ones(1, 3, 2), torch.zeros(1, 3, 2)
    x_t, timesteps = torch.randn(4, 4, 2, 2), torch.tensor([900, 900, 500, 500])
    for cfg_type in ("none", "self", "initialize", "full"):
        latents, steps = guidance.expand_unet_inputs(cfg_type, x_t, timesteps, 2)
        embeds = guidance.expand_prompt_embeds(cfg_type, cond, uncond, 4, 2)
        assert latents.shape[0] == steps.shape[0] == embeds.shape[0] == guidance.unet_batch_size(cfg_type, 2, 2)
        negative_rows = {"none": 0, "self": 0, "initialize": 2, "full": 4}[cfg_type]
        assert torch.equal(embeds[:negative_rows], uncond.expand(negative_rows, -1, -1))
        assert torch.equal(embeds[negative_rows:], cond.expand(4, -1, -1))
