"""Pure schedule math for the stream batch: per-slot coefficients, x0 prediction and re-noising."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import LCMScheduler


@dataclass(frozen=True)
class SlotSchedule:
    """Per-slot constants of one stream, each shaped `[n * frame_buffer_size, 1, 1, 1]`, slot-major.

    `alpha` = sqrt(ᾱ_t), `beta` = sqrt(1 − ᾱ_t); `c_skip`, `c_out` are the LCM boundary scalings.
    """

    timesteps: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    frames_per_slot: int

    @property
    def num_slots(self) -> int:
        return self.timesteps.shape[0] // self.frames_per_slot

    def slots(self, start: int, stop: int | None = None) -> SlotSchedule:
        """The constants of slots `start` to `stop` (exclusive; `None` = to the end)."""
        f = self.frames_per_slot
        rows = slice(start * f, None if stop is None else stop * f)
        return SlotSchedule(self.timesteps[rows], self.alpha[rows], self.beta[rows], self.c_skip[rows],
                            self.c_out[rows], f)


def slot_schedule(
    scheduler: LCMScheduler,
    num_inference_steps: int,
    t_index_list: tuple[int, ...],
    frames_per_slot: int,
    device: torch.device,
    dtype: torch.dtype,
) -> SlotSchedule:
    """Pick the timesteps `t_index_list` of an LCM schedule of `num_inference_steps` steps.

    `scheduler` is not changed: `set_timesteps` runs on a copy, since a model's scheduler is shared by streams.
    """
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    timesteps = scheduler.timesteps.long()[list(t_index_list)]
    alphas_cumprod = scheduler.alphas_cumprod.double()[timesteps]
    scalings = [scheduler.get_scalings_for_boundary_condition_discrete(int(t)) for t in timesteps]

    def per_row(values: torch.Tensor) -> torch.Tensor:
        values = values.repeat_interleave(frames_per_slot).view(-1, 1, 1, 1)
        return values.to(device=device, dtype=dtype)

    return SlotSchedule(
        timesteps=timesteps.repeat_interleave(frames_per_slot).to(device),
        alpha=per_row(alphas_cumprod.sqrt()),
        beta=per_row((1 - alphas_cumprod).sqrt()),
        c_skip=per_row(torch.tensor([float(s[0]) for s in scalings], dtype=torch.float64)),
        c_out=per_row(torch.tensor([float(s[1]) for s in scalings], dtype=torch.float64)),
        frames_per_slot=frames_per_slot,
    )


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """x_t = α·x0 + β·ε."""
    return alpha * x0 + beta * noise


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, schedule: SlotSchedule) -> torch.Tensor:
    """LCM consistency output: c_out·(x_t − β·ε)/α + c_skip·x_t."""
    return schedule.c_out * (x_t - schedule.beta * eps) / schedule.alpha + schedule.c_skip * x_t
