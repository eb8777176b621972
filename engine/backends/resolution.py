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

from ..config import ResolutionRange
from ..models import ModelBundle
from .onnx_export import HEIGHT_AXIS, WIDTH_AXIS

__all__ = ["ResolutionRange", "check_range", "dynamic_axis_ranges", "size_multiple"]

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
