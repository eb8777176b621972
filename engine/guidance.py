"""Classifier-free guidance modes, including Residual CFG (StreamDiffusion §3.3).

`none`: ε = ε_c. `full`: ε = ε_u + γ(ε_c − ε_u) with a second UNet half on the negative prompt.
`self` (RCFG self-negative): ε_u = δ·stock, no extra UNet rows. `initialize` (RCFG onetime-negative):
like `self`, but the newest slot's stock noise is the negative-prompt prediction (one extra slot of rows).
Every function here is pure: tensors in, tensors out.
"""

from __future__ import annotations

import torch

from .schedule import SlotSchedule, predict_x0


def unet_batch_size(cfg_type: str, num_slots: int, frames_per_slot: int = 1) -> int:
    """UNet rows per call: n, n, n+1 and 2n slots for none, self, initialize and full."""
    extra = {"none": 0, "self": 0, "initialize": 1, "full": num_slots}[cfg_type]
    return (num_slots + extra) * frames_per_slot


def uses_stock_noise(cfg_type: str) -> bool:
    """Whether the mode keeps RCFG stock noise."""
    return cfg_type in ("self", "initialize")


def needs_negative_prompt(cfg_type: str) -> bool:
    """Whether the mode runs UNet rows on the negative prompt."""
    return cfg_type in ("initialize", "full")


def expand_rows(cfg_type: str, rows: torch.Tensor, frames_per_slot: int) -> torch.Tensor:
    """Per-slot rows (latents, timesteps, control images) as the UNet batch of a mode; negative-prompt rows first."""
    if cfg_type == "initialize":
        return torch.cat([rows[:frames_per_slot], rows])
    if cfg_type == "full":
        return torch.cat([rows, rows])
    return rows


def expand_unet_inputs(
    cfg_type: str, x_t: torch.Tensor, timesteps: torch.Tensor, frames_per_slot: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's latent and timestep batch for a mode; negative-prompt rows come first."""
    return expand_rows(cfg_type, x_t, frames_per_slot), expand_rows(cfg_type, timesteps, frames_per_slot)


def expand_prompt_embeds(
    cfg_type: str, cond: torch.Tensor, uncond: torch.Tensor, rows: int, frames_per_slot: int
) -> torch.Tensor:
    """Text embeddings matching `expand_unet_inputs` for `rows` latent rows (cond/uncond: [1, L, D])."""
    cond_rows = cond.expand(rows, -1, -1)
    if cfg_type == "initialize":
        return torch.cat([uncond.expand(frames_per_slot, -1, -1), cond_rows]).contiguous()
    if cfg_type == "full":
        return torch.cat([uncond.expand(rows, -1, -1), cond_rows]).contiguous()
    return cond_rows.contiguous()


def guide(
    cfg_type: str,
    model_output: torch.Tensor,
    stock_noise: torch.Tensor | None,
    guidance_scale: float,
    delta: float,
    frames_per_slot: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combine the UNet output into the guided ε; returns (ε, stock noise after `initialize`'s refresh)."""
    if cfg_type == "none":
        return model_output, stock_noise
    if cfg_type == "full":
        eps_uncond, eps_cond = model_output.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond), stock_noise
    if cfg_type == "initialize":
        eps_cond = model_output[frames_per_slot:]
        stock_noise = torch.cat([model_output[:frames_per_slot], stock_noise[frames_per_slot:]])
    else:
        eps_cond = model_output
    eps_uncond = delta * stock_noise
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond), stock_noise


def carry_stock_noise(
    eps: torch.Tensor,
    stock_noise: torch.Tensor,
    current: SlotSchedule,
    following: SlotSchedule,
    following_noise: torch.Tensor,
) -> torch.Tensor:
    """RCFG's virtual residual noise of latents moving from `current` slots to `following` slots.

    Δx = step(ε, β·stock)·α_next/β_next; the latent enters its next slot with stock ε_next + Δx.
    """
    delta_x = predict_x0(current.beta * stock_noise, eps, current) * following.alpha / following.beta
    return following_noise + delta_x


def next_stock_noise(
    eps: torch.Tensor, stock_noise: torch.Tensor, fixed_noise: torch.Tensor, schedule: SlotSchedule
) -> torch.Tensor:
    """Stock noise for the next stream-batch call, aligned with the slots the latents move to.

    The latent leaving slot k enters slot k+1 carrying ε_{k+1} + Δx_k, and the newest frame enters
    slot 0 with its exact noise ε_0. (Upstream adds Δx_k to the stock of slot k itself, mixing
    neighbouring frames; aligning it keeps each frame's trajectory its own, so the stream batch
    equals sequential denoising in every guidance mode.)
    """
    f = schedule.frames_per_slot
    n = schedule.num_slots
    carried = carry_stock_noise(eps[:-f], stock_noise[:-f], schedule.slots(0, n - 1), schedule.slots(1),
                                fixed_noise[f:])
    return torch.cat([fixed_noise[:f], carried])
