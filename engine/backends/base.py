"""The interface every backend implements for the engine."""

from __future__ import annotations

from typing import Protocol

import torch

from ..control.residuals import ControlResiduals
from ..prompt import Conditioning


class NetworkRunner(Protocol):
    """Runs the UNet and the VAE halves; the engine never calls the modules directly."""

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """ε prediction for `latents` at `timesteps` (plus `conditioning.control`'s ControlNet residuals)."""

    def control_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The loaded ControlNet's condition embedding of control images in [0, 1] (`engine.controlnet.embed_control`),
        once per frame; runners without ControlNet support lack this method and `controlnet`."""

    def controlnet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                   embeddings: torch.Tensor) -> ControlResiduals:
        """The loaded ControlNet's residuals at scale 1 for these UNet rows and their embedded control images."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of scaled latents."""


def runner_name(runner: NetworkRunner) -> str:
    """A runner's backend name for logs (`eager`, `onnxruntime`, `eager+onnxruntime`, ...), else its class."""
    return getattr(runner, "backend", type(runner).__name__)
