"""Temporal steadiness (`temporal`, `TemporalSettings`; docs/temporal.md) as a part of one stream."""

from __future__ import annotations

import torch

from ..backends.base import runner_name
from ..backends.split import unet_runner_of
from ..config import StreamConfig
from ..temporal import TemporalFilter


class TemporalPart:
    """Holds the stream's `TemporalFilter` (a new one when the mechanism changes)."""

    def __init__(self, config: StreamConfig, device: torch.device, dtype: torch.dtype, runner):
        self.device, self.dtype = device, dtype
        self.check(config, runner)
        self.filter = TemporalFilter(config, device, dtype)

    def check(self, config: StreamConfig, runner) -> None:
        """Refuse what a temporal mechanism cannot run with, at once rather than on the first frame."""
        if config.temporal == "off":
            return
        if not config.stream_batch or config.frame_buffer_size != 1:
            raise ValueError(f"`temporal={config.temporal!r}` works on the stream batch of one frame per call: "
                             "it needs `stream_batch=True` and `frame_buffer_size=1`")
        if config.temporal == "bank":
            unet_runner = unet_runner_of(runner)
            if not unet_runner.capabilities.attention_bank:
                raise ValueError("`temporal='bank'` extends the UNet's self-attention per stream: it needs a UNet "
                                 "backend that takes the bank, eager, onnxruntime or tensorrt (this engine's is "
                                 f"{runner_name(unet_runner)}); use `temporal='flow'` on the others")
            if config.skip_policy != "off":
                raise ValueError("`temporal='bank'` and a skip policy both reuse attention across frames: use one")

    def update(self, old: StreamConfig, new: StreamConfig, runner, fresh: bool) -> None:
        if new.temporal != old.temporal:
            self.filter = TemporalFilter(new, self.device, self.dtype)
            return
        self.filter.update(new)
        if fresh:
            self.filter.reset()

    def primed(self, config: StreamConfig) -> None:
        self.filter.restart(config.denoising_steps)

    def reset(self) -> None:
        self.filter.reset()
