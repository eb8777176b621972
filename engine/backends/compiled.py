"""`torch.compile` backend: the UNet and the VAE halves compiled by TorchDynamo/Inductor."""

from __future__ import annotations

import logging
import threading
import time

import torch

from ..config import StreamConfig
from ..models import ModelBundle
from ..prompt import Conditioning
from .base import RunnerCapabilities
from .onnx_export import VaeDecoder, VaeEncoder
from .progress import heartbeat

logger = logging.getLogger(__name__)


class TorchCompileRunner:
    """`NetworkRunner` on `torch.compile`d modules (the bundle's own modules stay uncompiled).

    The first call of each shape compiles (minutes on a small CPU); later calls reuse the code.

    Args:
        models (`ModelBundle`): the models, on the device and dtype to run in.
        compile_backend (`str`): TorchDynamo backend, `inductor` by default.
        mode (`str`, *optional*): `torch.compile` mode, e.g. `max-autotune`.
    """

    #: No ControlNet and no attention bank (their inputs are not in the compiled graphs); a new shape compiles
    #: on its first call.
    capabilities = RunnerCapabilities("compile")

    def __init__(self, models: ModelBundle, compile_backend: str = "inductor", mode: str | None = None):
        self.models = models
        options = {"backend": compile_backend, "mode": mode, "dynamic": False}
        logger.info("torch.compile(%s) of the UNet and VAE; the first frame of each shape compiles", compile_backend)
        self._unet = torch.compile(models.unet, **options)
        self._encoder = torch.compile(VaeEncoder(models.vae).eval(), **options)
        self._decoder = torch.compile(VaeDecoder(models.vae).eval(), **options)
        # Graph keys (network, input shape) already compiled, and the seconds spent compiling, for the log.
        self._compiled: set[tuple[str, tuple[int, ...]]] = set()
        self.compile_seconds = 0.0
        self._lock = threading.Lock()

    def _call(self, network: str, shape: torch.Size, call):
        """`call()`, logged with its duration when it is the first of its (network, shape): that call compiles."""
        key = (network, tuple(shape))
        if key in self._compiled:
            return call()
        with self._lock:  # one compile at a time: the pipelined runtime's threads would only fight over cores
            if key in self._compiled:
                return call()
            logger.info("torch.compile: compiling the %s for input %s (minutes on a CPU)", network, list(shape))
            started = time.perf_counter()
            with heartbeat(logger, f"torch.compile of the {network}"):
                output = call()
            seconds = time.perf_counter() - started
            self._compiled.add(key)
            self.compile_seconds += seconds
            logger.info("torch.compile: compiled the %s in %.1f s (%d graph(s), %.1f s compiling in all)", network,
                        seconds, len(self._compiled), self.compile_seconds)
            return output

    @torch.no_grad()
    def prepare(self, config: StreamConfig, kv_cache: bool) -> None:
        """Nothing to open ahead: each shape compiles on its first call (logged with its duration)."""

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self._call("UNet", latents.shape, lambda: self._unet(
            latents, timesteps, return_dict=False, **conditioning.unet_kwargs())[0])

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self._call("VAE encoder", images.shape, lambda: self._encoder(images))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._call("VAE decoder", latents.shape, lambda: self._decoder(latents))
