"""Sliced forwards installed on diffusers' own module instances, and removed again without a trace.

A wrapper is installed by switching one instance's class to a subclass whose `forward` slices the
call and runs the original class's `forward` per slice (`super().forward`). Module names, parameters
and state dicts stay exactly as they were, `isinstance` checks still hold, and other code that wraps a
module's instance `forward` (the skip policies) composes with it. Removal restores the class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from .resnet import forward_in_bands
from .slicing import ChainGeometry, banded, batch_sliced, row_slices
from .streaming import streamed

_ORIGINAL_CLASS = "_memory_original_class"
_subclasses: dict[tuple[type, type], type] = {}


@dataclass(frozen=True)
class SliceSettings:
    """Slice sizes of the memory modes.

    Args:
        batch_rows (`int`, defaults to 1): stream-batch rows per slice of a ResNet, attention or whole block.
        query_rows (`int`, defaults to 1024): attention query tokens per chunk.
        feed_forward_tokens (`int`, defaults to 1024): tokens per chunk of a transformer feed-forward.
        band_rows (`int`, defaults to 32): image rows per band of a VAE layer (`slice`) or of the streamed
            TAESD (`group`), counted at the finest resolution.
        spatial_min_pixels (`int`, defaults to 262144): VAE layers run in bands only when their finest
            resolution has at least this many pixels (512x512): below it the halo costs more than it saves.
        resnet_band_rows (`int`, defaults to 16): rows per band of a UNet ResNet block (`group`).
        resnet_min_pixels (`int`, defaults to 4096): UNet ResNet blocks run in bands only from this many
            pixels per channel (64x64 latents, 512x512 images).
    """

    batch_rows: int = 1
    query_rows: int = 1024
    feed_forward_tokens: int = 1024
    band_rows: int = 32
    spatial_min_pixels: int = 512 * 512
    resnet_band_rows: int = 16
    resnet_min_pixels: int = 64 * 64

    def __post_init__(self) -> None:
        for name in ("batch_rows", "query_rows", "feed_forward_tokens", "band_rows", "resnet_band_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")


def wrap(module: nn.Module, mixin: type, **settings) -> None:
    """Switch `module`'s class to `mixin` over its own class, with `settings` as attributes (idempotent)."""
    unwrap(module)
    original = type(module)
    subclass = _subclasses.get((mixin, original))
    if subclass is None:
        subclass = type(f"{mixin.__name__}{original.__name__}", (mixin, original), {})
        _subclasses[(mixin, original)] = subclass
    module.__dict__[_ORIGINAL_CLASS] = original
    module.__dict__["_memory_settings"] = settings
    module.__class__ = subclass


def unwrap(module: nn.Module) -> None:
    """Give `module` back its own class and drop the wrapper's settings (no-op when not wrapped)."""
    original = module.__dict__.pop(_ORIGINAL_CLASS, None)
    if original is not None:
        module.__dict__.pop("_memory_settings", None)
        module.__class__ = original


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, kwargs.get("hidden_states"), kwargs.get("input_tensor"), kwargs.get("sample")):
        if isinstance(value, torch.Tensor):
            return value
    return None


class BatchSliced:
    """Runs the module's forward on batch slices of `batch_rows` rows (every batch-sized argument cut,
    including the K/V cache in `cross_attention_kwargs`); the outputs are assembled in place."""

    def forward(self, *args, **kwargs):
        step = self._memory_settings["batch_rows"]
        first = _first_tensor(args, kwargs)
        original = super().forward  # type: ignore[misc]
        if first is None or first.shape[0] <= step:
            return original(*args, **kwargs)
        return batch_sliced(original, first.shape[0], step, args, kwargs)


class UNetRows(BatchSliced):
    """Runs a whole `UNet2DConditionModel` one stream-batch slice at a time (operator grouping at the top
    level): a slice's skip connections and every block's output exist for that slice only."""

    def forward(self, *args, return_dict: bool = True, **kwargs):
        (sample,) = super().forward(*args, return_dict=False, **kwargs)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)


class ResnetBanded:
    """Runs a UNet ResNet block in row bands with two-pass GroupNorm (`resnet.forward_in_bands`) when its
    input has at least `min_pixels` pixels per channel."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        settings = self._memory_settings
        dropout = self.training and self.dropout.p > 0  # bands skip the dropout: only exact without it
        small = input_tensor.shape[-2] * input_tensor.shape[-1] < settings["min_pixels"]
        if dropout or small or args or kwargs:
            return super().forward(input_tensor, temb, *args, **kwargs)  # type: ignore[misc]
        return forward_in_bands(self, input_tensor, temb, settings["band_rows"])


class TokenChunked:
    """Runs a per-token module (a feed-forward) on chunks of `tokens` tokens of a `[batch, tokens, dim]` input."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        step = self._memory_settings["tokens"]
        original = super().forward  # type: ignore[misc]
        if hidden_states.ndim != 3 or hidden_states.shape[1] <= step:
            return original(hidden_states, *args, **kwargs)
        out = None
        for start, stop in row_slices(hidden_states.shape[1], step):
            piece = original(hidden_states[:, start:stop], *args, **kwargs)
            if out is None:
                out = piece.new_empty((hidden_states.shape[0], hidden_states.shape[1], piece.shape[-1]))
            out[:, start:stop] = piece
        return out


class RowBanded:
    """Runs a convolutional module in row bands with a halo (`slicing.banded`) when its input is large."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        settings = self._memory_settings
        geometry: ChainGeometry = settings["geometry"]
        original = super().forward  # type: ignore[misc]
        finest = x.shape[-2] * x.shape[-1] * max(1.0, geometry.scale) ** 2
        if finest < settings["min_pixels"]:
            return original(x)
        band = max(1, round(settings["band_rows"] / max(1.0, geometry.scale)))
        return banded(original, x, geometry, band)


class TinyStreamed:
    """Runs a whole TAESD encoder or decoder (`EncoderTiny`/`DecoderTiny`, including its input and output
    rescaling) streamed by rows (`streaming.streamed`) when its finest resolution has at least
    `min_pixels` pixels: every layer holds about one band of its own resolution, nothing is recomputed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        settings = self._memory_settings
        original = super().forward  # type: ignore[misc]
        scale: int = settings["scale"]
        if x.shape[-2] * x.shape[-1] * max(1, scale) ** 2 < settings["min_pixels"]:
            return original(x)
        band = max(1, settings["band_rows"] // max(1, scale))
        return streamed([settings["before"], *self.layers, settings["after"]], x, band, settings["band_rows"])
