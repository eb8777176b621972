"""Sequential denoising: the stream batch's steps one UNet call at a time, for one input.

It is what `stream_batch=False` runs and what the stream batch is tested equal to (DESIGN.md §2): the same
schedule, noise, guidance and ControlNet rows, step after step instead of slot after slot.
"""

from __future__ import annotations

import torch

from . import guidance
from .control.residuals import ControlFrames, ControlRows
from .schedule import SlotSchedule, add_noise, predict_x0
from .unet_call import UnetCall, run_calls


def sequential_denoise(stream, state, latents: torch.Tensor, control: ControlFrames | None = None) -> torch.Tensor:
    """x̂0 of `latents` after every step of `stream`'s schedule on `state` (its noise), one UNet call a step.

    `stream` is a `StreamEngine`: its config, runner and prompt conditioning are read, nothing is changed but
    `state`'s stock noise carried along as the stream batch would.
    """
    config, runner = stream.config, stream.runner
    cfg_type, n, f = config.cfg_type, config.denoising_steps, config.frame_buffer_size

    def unet_eps(step_cfg: str, x_t: torch.Tensor, schedule: SlotSchedule,
                 stock: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        unet_latents, unet_timesteps = guidance.expand_unet_inputs(step_cfg, x_t, schedule.timesteps, f)
        rows = None if control is None else ControlRows.for_call(step_cfg, control.embeddings, f,
                                                                 config.controlnet_scale)
        call = UnetCall(x_t, unet_latents, unet_timesteps, stream.conditioning(step_cfg, x_t.shape[0]), control=rows)
        (model_output,) = run_calls(runner, [call])
        return guidance.guide(step_cfg, model_output, stock, config.guidance_scale, config.delta, f)

    noise = state.fixed_noise
    stock = noise[:f] if guidance.uses_stock_noise(cfg_type) else None
    current = state.schedule.slots(0, 1)
    x_t = add_noise(latents, noise[:f], current.alpha, current.beta)
    for k in range(n):
        eps, stock = unet_eps("self" if cfg_type == "initialize" and k > 0 else cfg_type, x_t, current, stock)
        x0 = predict_x0(x_t, eps, current)
        if k == n - 1:
            break
        following = state.schedule.slots(k + 1, k + 2)
        next_noise = noise[(k + 1) * f:(k + 2) * f]
        if stock is not None:
            stock = guidance.carry_stock_noise(eps, stock, current, following, next_noise)
        x_t = add_noise(x0, next_noise, following.alpha, following.beta)
        current = following
    return x0
