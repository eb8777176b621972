"""`torch.compile` backend: the UNet and the VAE halves compiled by TorchDynamo/Inductor."""

from __future__ import annotations

import logging

import torch

from ..models import ModelBundle
from ..prompt import Conditioning
from .onnx_export import VaeDecoder, VaeEncoder

logger = logging.getLogger(__name__)


class TorchCompileRunner:
    """`NetworkRunner` on `torch.compile`d modules (the bundle's own modules stay uncompiled).

    The first call of each shape compiles (minutes on a small CPU); later calls reuse the code.

    Args:
        models (`ModelBundle`): the models, on the device and dtype to run in.
        compile_backend (`str`): TorchDynamo backend, `inductor` by default.
        mode (`str`, *optional*): `torch.compile` mode, e.g. `max-autotune`.
    """

    backend = "compile"

    def __init__(self, models: ModelBundle, compile_backend: str = "inductor", mode: str | None = None):
        self.models = models
        options = {"backend": compile_backend, "mode": mode, "dynamic": False}
        logger.info("torch.compile(%s) of the UNet and VAE; the first frame of each shape compiles", compile_backend)
        self._unet = torch.compile(models.unet, **options)
        self._encoder = torch.compile(VaeEncoder(models.vae).eval(), **options)
        self._decoder = torch.compile(VaeDecoder(models.vae).eval(), **options)

    @torch.no_grad()
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self._unet(latents, timesteps, return_dict=False, **conditioning.unet_kwargs())[0]

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._encoder(images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decoder(latents)
