"""Pure slicing helpers: cut call arguments into batch slices or row bands, and put results back.

Nothing here holds state: each function takes tensors (or nested tuples/lists/dicts of them) and
returns tensors. Results are written into one preallocated output, so a sliced call holds the final
output plus one slice's intermediates, never a list of every slice's result and then a copy of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

Nested = object  # a tensor, or a tuple/list/dict of nested values, or anything else (passed through)

# Modules whose output at a pixel depends only on the same pixel of their input (or containers of such
# modules and convolutions, whose receptive field `chain_geometry` bounds by summing their convolutions).
_POINTWISE = (nn.ReLU, nn.SiLU, nn.Tanh, nn.Identity, nn.LeakyReLU, nn.GELU, nn.Sigmoid)
_CONTAINERS = (nn.Sequential, AutoencoderTinyBlock)


def row_slices(rows: int, step: int) -> Iterator[tuple[int, int]]:
    """`[start, stop)` pairs covering `range(rows)` in pieces of at most `step`."""
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def take_rows(value: Nested, start: int, stop: int, rows: int) -> Nested:
    """`value` with every tensor whose first dimension is `rows` cut to `[start:stop]` (views, no copies)."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {key: take_rows(item, start, stop, rows) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(take_rows(item, start, stop, rows) for item in value)
    return value


def place_rows(out: Nested | None, piece: Nested, start: int, stop: int, rows: int) -> Nested:
    """Write `piece` (the result for rows `[start:stop]`) into `out`, allocating `out` on the first slice."""
    if isinstance(piece, torch.Tensor):
        if piece.shape[0] != stop - start:
            raise ValueError(f"a sliced call returned {piece.shape[0]} rows for the {stop - start} it was given")
        if out is None:
            out = piece.new_empty((rows, *piece.shape[1:]))
        out[start:stop] = piece
        return out
    if isinstance(piece, (tuple, list)):
        parts = [place_rows(None if out is None else out[i], item, start, stop, rows) for i, item in enumerate(piece)]
        return type(piece)(parts)
    raise TypeError(f"cannot assemble a sliced result of type {type(piece).__name__}")


def batch_sliced(call: Callable[..., Nested], rows: int, step: int, args: tuple, kwargs: dict) -> Nested:
    """`call(*args, **kwargs)` run on batch slices of at most `step` rows, results in one output.

    Exact for calls that treat batch rows independently (convolutions, per-sample GroupNorm, attention
    within a sample): each row sees the same numbers; only the kernels' batch size differs.
    """
    out = None
    for start, stop in row_slices(rows, step):
        piece = call(*take_rows(args, start, stop, rows), **take_rows(kwargs, start, stop, rows))
        out = place_rows(out, piece, start, stop, rows)
    return out


@dataclass(frozen=True)
class ChainGeometry:
    """How a chain of convolutions, resamplings and pointwise ops maps input rows to output rows.

    Args:
        halo (`int`): input rows each side of a band that the band's output rows can depend on,
            rounded up to a multiple of `align`.
        align (`int`): input rows per output row of the strided convolutions (band edges fall on it).
        scale (`float`): output rows per input row.
    """

    halo: int
    align: int
    scale: float


def chain_geometry(chain: nn.Module | Iterable[nn.Module]) -> ChainGeometry:
    """The receptive-field halo of `chain` (a module or consecutive layers), from its modules in
    registration (= execution) order.

    Branches (a residual block's convolutions and its skip) are summed as if sequential, which bounds
    their true receptive field from above. Raises `ValueError` for modules it cannot reason about
    (normalisations over the whole image, attention), which cannot be run in bands exactly.
    """
    halo, rows_per_row, scale, align = 0.0, 1.0, 1.0, 1
    layers = [chain] if isinstance(chain, nn.Module) else list(chain)
    for module in (module for layer in layers for module in layer.modules()):
        if isinstance(module, nn.Conv2d):
            kernel, stride = module.kernel_size[0], module.stride[0]
            halo += module.dilation[0] * (kernel - 1) // 2 * rows_per_row
            rows_per_row *= stride
            scale /= stride
            align = max(align, math.ceil(rows_per_row))
        elif isinstance(module, nn.Upsample):
            factor = float(module.scale_factor if not isinstance(module.scale_factor, tuple)
                           else module.scale_factor[0])
            if module.mode != "nearest" or factor != int(factor):
                raise ValueError(f"cannot band a {module.mode!r} upsampling by {factor}")
            halo += rows_per_row  # one source row of slack for nearest-neighbour rounding
            rows_per_row /= factor
            scale *= factor
        elif not isinstance(module, _POINTWISE + _CONTAINERS):
            raise ValueError(f"cannot run {type(module).__name__} in row bands exactly")
    return ChainGeometry(halo=align * math.ceil(halo / align), align=align, scale=scale)


def banded(call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, geometry: ChainGeometry,
           band_rows: int) -> torch.Tensor:
    """`call(x)` for a convolutional chain, computed in horizontal bands of `x` with a halo.

    Each band reads `geometry.halo` extra input rows each side (fewer at the image's edges, where the
    chain's own zero padding applies exactly as in one call), runs the chain on that slab and keeps the
    rows whose receptive field lies inside it. The result equals `call(x)` up to the kernels' own
    floating-point order: every kept value is computed from exactly the same inputs and weights.
    """
    height = x.shape[-2]
    step = max(geometry.align, band_rows - band_rows % geometry.align)
    if step + geometry.halo >= height:  # the first slab alone would be the whole image
        return call(x)
    out = None
    for start, stop in row_slices(height, step):
        lo, hi = max(0, start - geometry.halo), min(height, stop + geometry.halo)
        piece = call(x[..., lo:hi, :])
        # Band edges are aligned, so they map to whole output rows; a strided chain's last row rounds up.
        keep_from, keep_to = round((start - lo) * geometry.scale), math.ceil((stop - lo) * geometry.scale)
        if out is None:
            out = piece.new_empty((*piece.shape[:-2], math.ceil(height * geometry.scale), piece.shape[-1]))
        out[..., round(start * geometry.scale):math.ceil(stop * geometry.scale), :] = piece[..., keep_from:keep_to, :]
    return out
