"""The stream batch (DESIGN.md §2): one UNet call over every slot of the buffer, the newest frame in the first
slot, and the buffer shifted by one slot after it. `sequential.py` is the same steps one call at a time."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from . import guidance
from .config import StreamConfig
from .control.residuals import ControlFrames, ControlRows
from .prompt import Conditioning
from .schedule import add_noise, predict_x0
from .stream_state import StreamState
from .temporal import TemporalFilter
from .unet_call import UnetCall


def stream_inputs(state: StreamState, config: StreamConfig, latents: torch.Tensor, control: ControlFrames | None,
                  conditioning: Callable[[str, int], Conditioning], temporal: TemporalFilter) -> UnetCall:
    """The call of the newest frame's `latents` (noised to the first slot) and the buffer's slots: its UNet rows
    (guidance-expanded), the prompt's `conditioning` for them, the stream's attention bank, and with a ControlNet
    each slot's control images and scaled rows."""
    schedule, noise, f = state.schedule, state.fixed_noise, config.frame_buffer_size
    newest = add_noise(latents, noise[:f], schedule.alpha[:f], schedule.beta[:f])
    x_t = torch.cat([newest, state.buffer])
    unet_latents, unet_timesteps = guidance.expand_unet_inputs(config.cfg_type, x_t, schedule.timesteps, f)
    prompt = conditioning(config.cfg_type, x_t.shape[0])
    if temporal.bank is not None:
        prompt = dataclasses.replace(prompt, temporal_bank=temporal.bank)
    call = UnetCall(x_t, unet_latents, unet_timesteps, prompt)
    if control is not None:
        call.control_slots = ControlFrames.cat([control, state.control_buffer])
        call.control = ControlRows.for_call(config.cfg_type, call.control_slots.embeddings, f, config.controlnet_scale)
    return call


def stream_finish(state: StreamState, config: StreamConfig, call: UnetCall, model_output: torch.Tensor,
                  temporal: TemporalFilter) -> torch.Tensor:
    """Guide, predict every slot's x̂0, carry the stock noise and shift the buffer by one slot; returns the oldest
    slot's x̂0 (`frame_buffer_size` rows), the frame that leaves the buffer."""
    schedule, noise, f = state.schedule, state.fixed_noise, config.frame_buffer_size
    eps, stock = guidance.guide(config.cfg_type, model_output, state.stock_noise, config.guidance_scale,
                                config.delta, f)
    x0 = predict_x0(call.x_t, eps, schedule)
    temporal.after_call(x0, f)
    if stock is not None:
        state.stock_noise = guidance.next_stock_noise(eps, stock, noise, schedule)
    state.buffer = add_noise(x0[:-f], noise[f:], schedule.alpha[f:], schedule.beta[f:])
    if call.control_slots is not None:
        state.control_buffer = call.control_slots[:-f]
    return x0[-f:]
