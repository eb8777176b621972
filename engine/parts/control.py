"""A stream's ControlNet (`controlnet`, `ControlNetSettings`; docs/controlnet.md) as a part: each frame's control
images and their embedding, and the reuse of the residuals while the control image barely moves."""

from __future__ import annotations

import dataclasses

import torch

from ..backends.base import runner_name
from ..backends.split import unet_runner_of
from ..config import StreamConfig
from ..control.residuals import ControlFrames
from ..controlnet import ResidualReuse
from ..prompt import Conditioning


class ControlPart:
    """The engine's control source (None without a ControlNet) and this stream's residual reuse.

    Args:
        has_controlnet (`bool`): the engine loaded a ControlNet.
        source (`ControlSource | None`): makes a frame's control images (`Engine.control_source`).
    """

    def __init__(self, has_controlnet: bool, source, runner):
        self.has_controlnet = has_controlnet
        self.source = source
        self.reuse = ResidualReuse()
        self.check(None, runner)

    def check(self, config: StreamConfig | None, runner) -> None:
        unet_runner = unet_runner_of(runner)
        if self.has_controlnet and not unet_runner.capabilities.controlnet:
            raise ValueError(f"this engine has a ControlNet, but its UNet backend ({runner_name(unet_runner)}) cannot "
                             "run one: use `backend='eager'`, 'onnxruntime' or 'tensorrt'")

    def update(self, old: StreamConfig, new: StreamConfig, runner, fresh: bool) -> None:
        if fresh:
            self.reuse.reset()

    def primed(self, config: StreamConfig) -> None:
        self.reuse.reset()  # priming rows hold the empty buffer's garbage: no real frame may reuse their residuals

    def reset(self) -> None:
        self.reuse.reset()

    def frames(self, images: torch.Tensor, config: StreamConfig, runner, device: torch.device,
               dtype: torch.dtype) -> ControlFrames | None:
        """The control images of input `images` (in [0, 1]) and their condition embedding, once per frame (None
        without a ControlNet): off the UNet's thread, for every slot and guidance row the frame will take."""
        if self.source is None:
            return None
        control = self.source(images, config).to(device=device, dtype=dtype)
        return ControlFrames(control, runner.control_embedding(control))

    def conditioning(self, call, config: StreamConfig, runner) -> Conditioning:
        """`call`'s conditioning with its ControlNet residuals, reused from an earlier frame when `config`'s
        `controlnet_reuse_*` settings allow; unchanged without active control rows."""
        control = call.control
        if control is None or not control.active:
            return call.conditioning
        newest = call.control_slots.images[:config.frame_buffer_size]
        residuals = self.reuse.lookup(newest, control.embeddings.shape[0], config.controlnet_reuse_interval,
                                      config.controlnet_reuse_threshold)
        if residuals is None:
            residuals = runner.controlnet(call.latents, call.timesteps, call.conditioning, control.embeddings)
            self.reuse.store(residuals, newest)
        return dataclasses.replace(call.conditioning, control=residuals.scaled(control.scale))
