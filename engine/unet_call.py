"""The stream-batch UNet call, built in one place for one stream, for a batch of streams and for the skip policies.

A stream prepares a `UnetCall` (its slots' noisy latents and the guidance-expanded UNet inputs); `run_calls`
joins any number of them into one network call (each stream's rows keep their own conditioning and ControlNet
scale) and splits the output back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .control.residuals import ControlFrames, ControlResiduals, ControlRows
from .controlnet import with_control
from .prompt import Conditioning

UnetFunction = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


@dataclass
class UnetCall:
    """One stream-batch UNet call: the slots' noisy latents and the UNet's inputs built from them."""

    x_t: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    conditioning: Conditioning
    #: With a ControlNet: each slot's control image and embedding (ordered like `x_t`) and the UNet rows made of them.
    control_slots: ControlFrames | None = None
    control: ControlRows | None = None


def concat_conditioning(conditionings: Sequence[Conditioning]) -> Conditioning:
    """One `Conditioning` for the concatenated rows: embeddings, each layer's K/V and SDXL's added inputs joined
    along the batch."""
    states = torch.cat([c.encoder_hidden_states for c in conditionings])
    first = conditionings[0]
    kv_cache = None
    if first.kv_cache is not None:
        kv_cache = {name: (torch.cat([c.kv_cache[name][0] for c in conditionings]),
                           torch.cat([c.kv_cache[name][1] for c in conditionings]))
                    for name in first.kv_cache}
    added = None
    if first.added_cond is not None:
        added = {name: torch.cat([c.added_cond[name] for c in conditionings]) for name in first.added_cond}
    control = None
    if first.control is not None:
        control = ControlResiduals.from_tensors([torch.cat(parts) for parts in
                                                 zip(*(c.control.tensors() for c in conditionings), strict=True)])
    return Conditioning(states, kv_cache, added, control=control)


def run_calls(runner, calls: Sequence[UnetCall], unet: UnetFunction | None = None) -> list[torch.Tensor]:
    """The model output of each of `calls`, from one network call over all their rows.

    Calls whose `control` rows are still to be run get one ControlNet call for all of them, each row scaled by
    its own stream's `controlnet_scale` (a call that already holds its residuals, reused ones, has `control`
    None). `unet` replaces `runner.unet` (a skip policy's piecewise UNet).
    """
    latents = torch.cat([call.latents for call in calls]) if len(calls) > 1 else calls[0].latents
    timesteps = torch.cat([call.timesteps for call in calls]) if len(calls) > 1 else calls[0].timesteps
    conditioning = concat_conditioning([call.conditioning for call in calls]) if len(calls) > 1 \
        else calls[0].conditioning
    if calls[0].control is not None:
        control = ControlRows.cat([call.control for call in calls]) if len(calls) > 1 else calls[0].control
        conditioning = with_control(runner, latents, timesteps, conditioning, control)
    output = (unet or runner.unet)(latents, timesteps, conditioning)
    return list(torch.split(output, [call.latents.shape[0] for call in calls])) if len(calls) > 1 else [output]
