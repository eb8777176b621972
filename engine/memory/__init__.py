"""Peak-memory modes for high resolutions: the feature slicer and operator grouping of Streamlined
Inference (arXiv 2411.01171) applied to the UNet and the VAE of a shared `ModelBundle`.

- `slice` (feature slicer): each ResNet block runs one stream-batch row at a time, each attention
  layer one row and `query_rows` query tokens at a time (keeping the per-prompt K/V cache), each
  feed-forward `feed_forward_tokens` tokens at a time, and each TAESD block at large resolutions in row
  bands with a halo; the VAE encodes/decodes one image at a time.
- `group` (operator grouping): each whole UNet down, mid and up block (ResNets, transformers,
  resamplers) runs one stream-batch row at a time, attention and feed-forwards chunked as in `slice`,
  and the TAESD's large-resolution stages run as one chain, band by band.
- `off`: nothing installed; the modules are exactly diffusers' own.

Everything is exact up to floating-point order (see docs/memory.md for what is bit-exact). The mode
belongs to the model set: `apply_memory_mode` replaces whatever mode was installed, and `off` removes
every wrapper and restores the original attention processors and VAE slicing flag.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import torch
from diffusers import AutoencoderTiny
from diffusers.models.attention import FeedForward
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

from ..config import MEMORY_MODES
from ..models import ModelBundle
from .attention import SlicedKVAttnProcessor
from .resnet import supports_bands
from .slicing import chain_geometry
from .streaming import check_streamable
from .wrappers import (
    BatchSliced,
    ResnetBanded,
    RowBanded,
    SliceSettings,
    TinyStreamed,
    TokenChunked,
    UNetRows,
    unwrap,
    wrap,
)

__all__ = ["MEMORY_MODES", "SliceSettings", "SlicedKVAttnProcessor", "apply_memory_mode", "memory_mode"]


@dataclass
class _Installed:
    mode: str
    settings: SliceSettings
    processors: dict
    vae: nn.Module
    vae_slicing: bool | None


_installed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def memory_mode(models: ModelBundle) -> str:
    """The memory mode installed on `models` (`off` when none)."""
    installed = _installed.get(models.unet)
    return installed.mode if installed is not None else "off"


def apply_memory_mode(models: ModelBundle, mode: str, settings: SliceSettings | None = None) -> None:
    """Install memory mode `mode` (`off|slice|group`) on `models`, replacing the one installed (idempotent).

    The mode is a property of the shared model set: every stream on `models` runs with it.
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"`memory` must be one of {MEMORY_MODES}, got {mode!r}")
    settings = settings or SliceSettings()
    with _lock:
        installed = _installed.get(models.unet)
        same = installed is not None and (installed.mode, installed.settings) == (mode, settings)
        if same and installed.vae is models.vae:
            # Another stream may be mid-call on these modules: never re-install the same mode under it.
            return
        _remove(models)
        if mode == "off":
            return
        unet, vae = models.unet, models.vae
        processors = dict(unet.attn_processors)
        _installed[unet] = _Installed(mode, settings, processors, vae, getattr(vae, "use_slicing", None))
        unet.set_attn_processor({
            name: SlicedKVAttnProcessor(name.removesuffix(".processor"), settings.batch_rows, settings.query_rows)
            for name in processors
        })
        for module in unet.modules():
            if isinstance(module, FeedForward):
                wrap(module, TokenChunked, tokens=settings.feed_forward_tokens)
        if mode == "slice":
            for module in unet.modules():
                if isinstance(module, ResnetBlock2D):
                    wrap(module, BatchSliced, batch_rows=settings.batch_rows)
        else:
            wrap(unet, UNetRows, batch_rows=settings.batch_rows)
            for module in unet.modules():
                if isinstance(module, ResnetBlock2D) and supports_bands(module):
                    wrap(module, ResnetBanded, band_rows=settings.resnet_band_rows,
                         min_pixels=settings.resnet_min_pixels)
        _apply_to_vae(vae, mode, settings)


def _apply_to_vae(vae: nn.Module, mode: str, settings: SliceSettings) -> None:
    # diffusers' own VAE slicing runs a batch one image at a time: exact for both VAE classes.
    if hasattr(vae, "use_slicing"):
        vae.use_slicing = True
    # Spatial bands only for TAESD: it has no normalisation over the image. AutoencoderKL's GroupNorm
    # layers need the whole image's statistics; diffusers' tiling of it blends tiles (approximate).
    if not isinstance(vae, AutoencoderTiny):
        return
    if mode == "slice":
        for module in vae.modules():
            if isinstance(module, AutoencoderTinyBlock):
                wrap(module, RowBanded, geometry=chain_geometry(module), band_rows=settings.band_rows,
                     min_pixels=settings.spatial_min_pixels)
    else:
        # The same rescalings as diffusers' `EncoderTiny.forward` / `DecoderTiny.forward`, applied per band
        # (the tests compare against diffusers' own forward, so a change there shows up as a failure).
        for coder, before, after in ((vae.encoder, _taesd_encoder_input, _identity),
                                     (vae.decoder, _taesd_decoder_input, _taesd_decoder_output)):
            check_streamable(coder.layers)
            upsampling = math.prod(int(layer.scale_factor) for layer in coder.layers if isinstance(layer, nn.Upsample))
            wrap(coder, TinyStreamed, before=before, after=after, scale=upsampling, band_rows=settings.band_rows,
                 min_pixels=settings.spatial_min_pixels)


def _taesd_encoder_input(x: torch.Tensor) -> torch.Tensor:
    return x.add(1).div(2)  # [-1, 1] to TAESD's [0, 1]


def _taesd_decoder_input(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x / 3) * 3  # TAESD's latent clamp


def _taesd_decoder_output(x: torch.Tensor) -> torch.Tensor:
    return x.mul(2).sub(1)  # TAESD's [0, 1] to [-1, 1]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _remove(models: ModelBundle) -> None:
    installed = _installed.pop(models.unet, None)
    if installed is None:
        return
    models.unet.set_attn_processor(installed.processors)
    for module in (*models.unet.modules(), *installed.vae.modules()):
        unwrap(module)
    if installed.vae_slicing is not None:
        installed.vae.use_slicing = installed.vae_slicing
