"""What one stream carries between frames, and each frame on its way through the three stages."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import guidance
from .config import StreamConfig
from .control.residuals import ControlFrames
from .models import ModelBundle
from .noise import weighted_seed_noise
from .schedule import SlotSchedule, slot_schedule
from .temporal import Motion


@dataclass
class StepResult:
    """One call's output: images in [0, 1] shaped like the input, and whether the filter skipped it."""

    images: torch.Tensor
    skipped: bool


@dataclass
class StreamState:
    """Mutable per-stream tensors; replaced as a whole on re-prepare."""

    schedule: SlotSchedule
    fixed_noise: torch.Tensor
    stock_noise: torch.Tensor | None
    buffer: torch.Tensor | None = None
    #: A frame was let through on this state, so a later skipped frame has an output to repeat.
    has_frames: bool = False
    last_output: torch.Tensor | None = None
    #: With a ControlNet: the control images (and embeddings) of the buffer's slots, shifted with the latents.
    control_buffer: ControlFrames | None = None


@dataclass
class FrameWork:
    """A frame on its way through `StreamEngine.begin` → `advance` → `finish`, which may run on three threads.

    The input image is not kept: at large sizes it would hold memory for the frame's whole way.
    `state` is the stream state the frame advanced (set by `advance`; for a skipped frame, by `begin`: the
    state whose last output it repeats). `latents` are the VAE latents, `denoised` the x̂0 latents to decode.
    """

    skipped: bool
    single: bool
    state: StreamState | None = None
    latents: torch.Tensor | None = None
    denoised: torch.Tensor | None = None
    output: torch.Tensor | None = None
    #: `temporal="flow"`: this frame's input motion (`begin`), then that of the frame it outputs (`advance`).
    motion: Motion | None = None
    #: With a ControlNet: this frame's control images (`begin`), then those of the frame it outputs (`advance`).
    control: ControlFrames | None = None

    def result(self) -> StepResult:
        """The frame's `StepResult`, one image for a single-image input."""
        return StepResult(images=self.output[0] if self.single else self.output, skipped=self.skipped)


def latent_shape(models: ModelBundle, config: StreamConfig) -> tuple[int, int, int]:
    """(channels, height, width) of one latent at `config`'s size."""
    factor = models.vae_scale_factor
    return (models.unet.config.in_channels, config.height // factor, config.width // factor)


def prompt_layouts(config: StreamConfig) -> list[tuple[str, int]]:
    """The (guidance mode, slot rows) of every UNet call a stream under `config` makes: its prompt's layouts."""
    f, n = config.frame_buffer_size, config.denoising_steps
    if config.stream_batch:
        return [(config.cfg_type, n * f)]
    layouts = [(config.cfg_type, f)]
    if config.cfg_type == "initialize":
        layouts.append(("self", f))
    return layouts


def new_noise(models: ModelBundle, config: StreamConfig, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The fixed per-slot-row noise of `config`'s (weighted) seeds."""
    rows = config.denoising_steps * config.frame_buffer_size
    noise = weighted_seed_noise(config.weighted_seeds, (rows, *latent_shape(models, config)))
    return noise.to(device=device, dtype=dtype)


def new_state(models: ModelBundle, config: StreamConfig, device: torch.device, dtype: torch.dtype) -> StreamState:
    """A fresh state under `config`: its schedule and noise, an empty buffer (primed by the next frame)."""
    schedule = slot_schedule(models.scheduler, config.num_inference_steps, config.t_index_list,
                             config.frame_buffer_size, device, dtype)
    noise = new_noise(models, config, device, dtype)
    stock = noise.clone() if guidance.uses_stock_noise(config.cfg_type) else None
    return StreamState(schedule=schedule, fixed_noise=noise, stock_noise=stock)
