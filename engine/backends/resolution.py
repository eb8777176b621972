"""Resolution ranges: one dynamic-shape graph (and TensorRT engine) for every frame size inside a range.

Static graphs are the default: one graph per size, the fastest for a server that keeps one size
(docs/backends.md has the measurement). A `ResolutionRange` opts in to graphs whose height and width
are dynamic between `min_size` and `max_size`, so a session that changes resolution inside the range
needs no new export or engine build. The batch stays static (it is fixed per guidance mode).

Every size must be a multiple of `size_multiple(models)`: the VAE's scale factor times the UNet's total
upsampling (8 · 2³ = 64 pixels for Stable Diffusion), because the UNet's skip connections only line up
for latents divisible by its downsampling, and the dynamo exporter needs that divisibility stated (the
exported graph's height is `multiple · h` for a symbolic `h`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..models import ModelBundle
from .onnx_export import HEIGHT_AXIS, WIDTH_AXIS

RESOLUTION_RANGE_ENV = "STREAMDIFF_RESOLUTION_RANGE"
# What TensorRT optimises for when no opt size is given: the size most sessions run (clamped into the range).
DEFAULT_OPT_SIZE = 512

_RANGE_TEXT = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class ResolutionRange:
    """Frame sizes, each side from `min_size` to `max_size` pixels, served by one dynamic-shape graph.

    Args:
        min_size (`int`): the smallest height or width, in pixels.
        max_size (`int`): the largest height or width, in pixels.
        opt_size (`int`): the size TensorRT tunes its kernels for (the profile's opt) and the export's
            sample size; it is part of the cache key.
    """

    min_size: int
    max_size: int
    opt_size: int

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= self.opt_size <= self.max_size:
            raise ValueError(f"a resolution range needs 0 < min <= opt <= max, got {self.min_size}-{self.max_size} "
                             f"with opt {self.opt_size}")
        if any(size % 8 for size in (self.min_size, self.max_size, self.opt_size)):
            raise ValueError(f"resolution range sizes must be multiples of 8, got {self}")

    @classmethod
    def between(cls, min_size: int, max_size: int, opt_size: int | None = None) -> ResolutionRange:
        """The range `min_size`–`max_size`; `opt_size` defaults to 512 clamped into the range."""
        if opt_size is None:
            opt_size = min(max(DEFAULT_OPT_SIZE, min_size), max_size)
        return cls(int(min_size), int(max_size), int(opt_size))

    def covers(self, height: int, width: int, multiple: int) -> bool:
        """Whether a `height`×`width` frame runs on this range's graphs (both sides inside, multiples of `multiple`)."""
        return all(self.min_size <= size <= self.max_size and size % multiple == 0 for size in (height, width))

    def key(self) -> tuple[int, int, int]:
        """(min, opt, max): the range's part of a cache key."""
        return self.min_size, self.opt_size, self.max_size

    def __str__(self) -> str:
        default_opt = min(max(DEFAULT_OPT_SIZE, self.min_size), self.max_size)
        suffix = "" if self.opt_size == default_opt else f":{self.opt_size}"
        return f"{self.min_size}-{self.max_size}{suffix}"


def parse_resolution_range(text: str) -> ResolutionRange:
    """`"256-1024"` (opt 512) or `"256-1024:768"` (opt 768) as a `ResolutionRange`.

    Raises:
        ValueError: text of another form, or sizes that do not make a range.
    """
    match = _RANGE_TEXT.match(text)
    if match is None:
        raise ValueError(f"a resolution range is MIN-MAX or MIN-MAX:OPT in pixels (e.g. 256-1024), got {text!r}")
    low, high, opt = match.groups()
    return ResolutionRange.between(int(low), int(high), int(opt) if opt is not None else None)


def resolution_range_from_env() -> ResolutionRange | None:
    """`$STREAMDIFF_RESOLUTION_RANGE` parsed, or None when it is unset or empty (static graphs)."""
    text = os.environ.get(RESOLUTION_RANGE_ENV, "").strip()
    return parse_resolution_range(text) if text else None


def size_multiple(models: ModelBundle) -> int:
    """The pixel multiple every frame side must be for the UNet's skip connections to line up."""
    return models.vae_scale_factor * 2 ** int(models.unet.num_upsamplers)


def check_range(resolution_range: ResolutionRange, multiple: int) -> ResolutionRange:
    """`resolution_range` when its sizes are multiples of `multiple` (see `size_multiple`).

    Raises:
        ValueError: a size that is not a multiple, naming the nearest valid range.
    """
    sizes = resolution_range.key()
    if any(size % multiple for size in sizes):
        low = -(-resolution_range.min_size // multiple) * multiple
        high = max(low, resolution_range.max_size // multiple * multiple)
        raise ValueError(f"every size of resolution range {resolution_range} must be a multiple of {multiple} for "
                         f"this model (its VAE factor times its UNet's upsampling), e.g. {low}-{high}")
    return resolution_range


def dynamic_axis_ranges(network: str, resolution_range: ResolutionRange,
                        vae_scale_factor: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of the dynamic axes of `network`'s graph, in its first input's units.

    The UNet and the VAE decoder take latents (pixels / `vae_scale_factor`), the encoder takes pixels;
    this is what `tensorrt.profile_shapes` needs for a dynamic graph.
    """
    if network not in ("unet", "vae_encoder", "vae_decoder"):
        raise ValueError(f"unknown network {network!r}")
    scale = 1 if network == "vae_encoder" else vae_scale_factor
    bounds = tuple(size // scale for size in resolution_range.key())
    return {HEIGHT_AXIS: bounds, WIDTH_AXIS: bounds}
