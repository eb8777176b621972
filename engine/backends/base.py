"""The interface every backend implements for the engine, and the typed record of what a backend can do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..config import StreamConfig
from ..control.residuals import ControlResiduals
from ..prompt import Conditioning


@dataclass(frozen=True)
class RunnerCapabilities:
    """What a runner can do, declared by its class: the engine reads this record, never probes the runner.

    Args:
        name (`str`): the backend's name for logs (`eager`, `onnxruntime`, `eager+onnxruntime`, ...).
        dynamic_batch (`bool`): any UNet batch size runs in one call, so streams may share calls
            (`engine.batching`).
        attention_bank (`bool`): runs `temporal="bank"` streams.
        controlnet (`bool`): runs a loaded ControlNet (`control_embedding`, `controlnet`).
        graphs_per_shape (`bool`): opens a compiled graph per call shape (`prepare` opens a stream's ahead).
    """

    name: str
    dynamic_batch: bool = False
    attention_bank: bool = False
    controlnet: bool = False
    graphs_per_shape: bool = False


class NetworkRunner(Protocol):
    """Runs the UNet and the VAE halves; the engine never calls the modules directly."""

    #: What this runner can do.
    capabilities: RunnerCapabilities

    def prepare(self, config: StreamConfig, kv_cache: bool) -> None:
        """Open whatever a stream under `config` needs before its first frame (compiled graphs); a runner that
        opens nothing ahead does nothing."""

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """ε prediction for `latents` at `timesteps` (plus `conditioning.control`'s ControlNet residuals)."""

    def control_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The loaded ControlNet's condition embedding of control images in [0, 1] (`engine.controlnet.embed_control`),
        once per frame; only called on runners whose `capabilities.controlnet` is true."""

    def controlnet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                   embeddings: torch.Tensor) -> ControlResiduals:
        """The loaded ControlNet's residuals at scale 1 for these UNet rows and their embedded control images."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of scaled latents."""


def runner_name(runner: NetworkRunner) -> str:
    """A runner's backend name for logs (`eager`, `onnxruntime`, `eager+onnxruntime`, ...)."""
    return runner.capabilities.name
