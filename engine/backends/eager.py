"""Eager PyTorch backend: calls the diffusers modules directly."""

from __future__ import annotations

import torch
from diffusers import AutoencoderTiny

from ..config import StreamConfig
from ..control.residuals import ControlResiduals
from ..controlnet import embed_control, run_controlnet_body
from ..models import ModelBundle
from ..prompt import Conditioning
from .base import RunnerCapabilities


class EagerRunner:
    """Runs the bundle's modules in PyTorch, without compilation."""

    #: Any batch size runs as is, so streams may share calls; `temporal="bank"` streams' `AttentionBank` reaches
    #: the attention processors; the ControlNet runs in PyTorch.
    capabilities = RunnerCapabilities("eager", dynamic_batch=True, attention_bank=True, controlnet=True)

    def __init__(self, models: ModelBundle):
        self.models = models
        self.scaling_factor = float(models.vae.config.scaling_factor)
        if isinstance(models.vae, AutoencoderTiny):
            # TAESD is convolutions only: NHWC weights make oneDNN/cuDNN pick faster kernels (identical outputs;
            # figures in docs/batching.md), and a batch of n images then costs less than n calls.
            models.vae.to(memory_format=torch.channels_last)

    def prepare(self, config: StreamConfig, kv_cache: bool) -> None:
        """Nothing to open ahead: the modules run any shape."""

    @torch.no_grad()
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self.models.unet(latents, timesteps, return_dict=False, **conditioning.unet_kwargs())[0]

    @torch.no_grad()
    def control_embedding(self, images: torch.Tensor) -> torch.Tensor:
        return embed_control(self.models.controlnet, images)

    @torch.no_grad()
    def controlnet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                   embeddings: torch.Tensor) -> ControlResiduals:
        return run_controlnet_body(self.models.controlnet, latents, timesteps, conditioning.encoder_hidden_states,
                                   embeddings, conditioning.added_cond)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.models.vae
        if isinstance(vae, AutoencoderTiny):
            latents = vae.encode(images).latents
        else:
            latents = vae.encode(images).latent_dist.mean
        return (latents * self.scaling_factor).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.models.vae.decode(latents / self.scaling_factor).sample.clamp(-1, 1).contiguous()
