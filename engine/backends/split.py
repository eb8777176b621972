"""A runner whose UNet and VAE run on different backends (`LoadConfig.vae_backend`).

Why: the two halves want different things. The UNet call is where sessions batch (`engine.batching`),
which only a dynamic-batch runner (eager PyTorch) can do, while the VAE always runs one frame of a fixed
size per call, exactly what a static-shape graph is for: on a CPU, ONNX Runtime runs the TAESD halves
faster than eager PyTorch (figures in docs/backends.md). An eager UNet with ONNX Runtime VAE keeps
cross-session batching and takes the faster VAE.
"""

from __future__ import annotations

import torch

from ..config import StreamConfig
from ..control.residuals import ControlResiduals
from ..prompt import Conditioning
from .base import NetworkRunner, RunnerCapabilities


class SplitRunner:
    """`NetworkRunner` that sends the UNet (and the ControlNet, which runs beside it) to one runner and the VAE
    encode/decode to another.

    Args:
        unet_runner (`NetworkRunner`): runs `unet`; its `dynamic_batch` decides whether sessions batch.
        vae_runner (`NetworkRunner`): runs `encode` and `decode`.
    """

    def __init__(self, unet_runner: NetworkRunner, vae_runner: NetworkRunner):
        if unet_runner.models is not vae_runner.models:
            raise ValueError("`unet_runner` and `vae_runner` must run the same model set")
        self.models = unet_runner.models
        self.unet_runner = unet_runner
        self.vae_runner = vae_runner
        unet = unet_runner.capabilities
        # The UNet half decides batching, the bank and the ControlNet; graphs open ahead if either half has them.
        self.capabilities = RunnerCapabilities(
            f"{unet.name}+{vae_runner.capabilities.name}", dynamic_batch=unet.dynamic_batch,
            attention_bank=unet.attention_bank, controlnet=unet.controlnet,
            graphs_per_shape=unet.graphs_per_shape or vae_runner.capabilities.graphs_per_shape)

    def prepare(self, config: StreamConfig, kv_cache: bool) -> None:
        """Open the graphs each half needs for a stream under `config` (the UNet's and the ControlNet's, or the
        VAE's)."""
        for runner, networks in ((self.unet_runner, ("unet", "controlnet")),
                                 (self.vae_runner, ("vae_encoder", "vae_decoder"))):
            if runner.capabilities.graphs_per_shape:
                runner.prepare(config, kv_cache, networks=networks)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self.unet_runner.unet(latents, timesteps, conditioning)

    def control_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.unet_runner.control_embedding(images)

    def controlnet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                   embeddings: torch.Tensor) -> ControlResiduals:
        """The UNet runner's ControlNet (`StreamEngine` refuses a ControlNet when that runner has none)."""
        return self.unet_runner.controlnet(latents, timesteps, conditioning, embeddings)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae_runner.encode(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae_runner.decode(latents)


def unet_runner_of(runner: NetworkRunner) -> NetworkRunner:
    """The runner that runs `runner`'s UNet (itself unless it is a `SplitRunner`)."""
    return runner.unet_runner if isinstance(runner, SplitRunner) else runner
