"""The split UNet forward equals diffusers' forward exactly, and the change guard's rules."""

from __future__ import annotations

import pytest
import torch

from engine.config import SkipSettings, StreamConfig
from engine.prompt import Conditioning, install_kv_processors, precompute_kv
from engine.schedule import slot_schedule
from engine.skip.adacache import codebook_frames
from engine.skip.base import ChangeGuard, SlotFrame
from engine.skip.unet_split import split_unet_forward


@pytest.mark.parametrize("latent_size", [(4, 4), (6, 10)])
@pytest.mark.parametrize("use_kv_cache", [False, True])
def test_split_forward_equals_the_unet(tiny_models, latent_size, use_kv_cache):
    unet = tiny_models.unet
    install_kv_processors(unet)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, *latent_size, generator=generator)
    timesteps = torch.tensor([999, 500, 20])
    states = torch.randn(3, 77, unet.config.cross_attention_dim, generator=generator)
    conditioning = Conditioning(states, precompute_kv(unet, states) if use_kv_cache else None)
    kwargs = {"cross_attention_kwargs": {"kv_cache": conditioning.kv_cache}} if use_kv_cache else {}
    with torch.no_grad():
        expected = unet(latents, timesteps, encoder_hidden_states=states, return_dict=False, **kwargs)[0]
        assert torch.equal(split_unet_forward(unet, latents, timesteps, conditioning), expected)


def _frame(tiny_models, clean: torch.Tensor, frames_per_slot: int = 1) -> SlotFrame:
    slots = clean.shape[0] // frames_per_slot
    schedule = slot_schedule(tiny_models.scheduler, 50, tuple(range(0, 40, 40 // slots))[:slots], frames_per_slot,
                             torch.device("cpu"), torch.float32)
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    return SlotFrame(schedule.alpha * clean + schedule.beta * noise, schedule, noise)


def test_clean_latents_remove_the_known_noise(tiny_models):
    clean = torch.randn(3, 4, 4, 4)
    torch.testing.assert_close(_frame(tiny_models, clean).clean_latents(), clean, rtol=0, atol=1e-5)


def test_guard_forces_on_cuts_drift_and_age_and_carries_a_cut_down_the_slots(tiny_models):
    # The settings a stream gets from its config's flat (wire) names.
    settings = StreamConfig().updated(skip_cut_threshold=0.1, skip_accumulated_threshold=0.15, skip_max_age=4).skip
    assert settings == SkipSettings(cut_threshold=0.1, accumulated_threshold=0.15, max_age=4)
    guard = ChangeGuard(settings)
    base = torch.ones(3, 4, 4, 4)
    assert guard.observe(_frame(tiny_models, base)).all()  # no reference yet
    guard.computed(torch.ones(3, dtype=torch.bool))
    assert not guard.observe(_frame(tiny_models, base)).any()
    cut = base.clone()
    cut[0] *= 1.5  # δ = 0.5 on slot 0 only
    forced = guard.observe(_frame(tiny_models, cut))
    assert forced.tolist() == [True, False, False]
    assert float(guard.delta[0]) == pytest.approx(0.5, rel=1e-4)
    guard.computed(forced)
    # The cut frame moved to slot 1: recomputed there although slot 1's own latent did not change.
    assert guard.observe(_frame(tiny_models, cut)).tolist() == [False, True, False]
    guard.computed(torch.ones(3, dtype=torch.bool))
    assert guard.observe(_frame(tiny_models, cut)).tolist() == [False, False, True]
    guard.computed(torch.ones(3, dtype=torch.bool))
    drift = cut.clone()
    steps = []
    for sign in (1, -1, 1):  # jitter of 0.06 of the reference: δ stays under τ_cut, the sum passes 0.15
        drift[2] += sign * 0.06
        steps.append(bool(guard.observe(_frame(tiny_models, drift))[2]))
    assert steps == [False, False, True]
    guard.computed(torch.ones(3, dtype=torch.bool))
    ages = [bool(guard.observe(_frame(tiny_models, drift))[1]) for _ in range(4)]
    assert ages == [False, False, False, True]


def test_slot_rows_of_every_guidance_layout(tiny_models):
    frame = _frame(tiny_models, torch.randn(4, 4, 4, 4), frames_per_slot=2)  # 2 slots × 2 frames
    assert frame.unet_rows_to_slot_rows(4).tolist() == [0, 1, 2, 3]
    assert frame.unet_rows_to_slot_rows(8).tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert frame.unet_rows_to_slot_rows(6).tolist() == [0, 1, 0, 1, 2, 3]
    with pytest.raises(ValueError):
        frame.unet_rows_to_slot_rows(5)


def test_codebook_maps_changes_to_frames():
    codebook = ((0.02, 4), (0.04, 3), (0.08, 2), (1.0, 1))
    change = torch.tensor([0.0, 0.02, 0.03, 0.05, 0.5, 1.0, 3.0])
    assert codebook_frames(change, codebook).tolist() == [4, 4, 3, 2, 1, 1, 1]
