"""A UNet ResNet block run in row bands with two-pass GroupNorm: statistics over the whole image first,
then normalisation, activation and convolution band by band.

GroupNorm needs the mean and variance of each group over the whole image, so a plain band cannot compute
it; but the statistics are a few numbers per group. With them computed first (one pass, no copy), every
band is normalised exactly as in one call, and a 3x3 convolution needs only one neighbouring row each
side. So `norm1 → SiLU → conv1` writes `conv1`'s output band by band (the block's only full-size
intermediate), and `norm2 → SiLU → conv2 → + shortcut` writes the block's output band by band: the
normalised and activated copies of the input (the largest tensors of the block: a decoder ResNet's
input is the concatenation with its skip connection) never exist for more than one band.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .slicing import row_slices


def supports_bands(block: ResnetBlock2D) -> bool:
    """Whether `block` is the plain form `forward_in_bands` reproduces (no resampling, no scale-shift
    time embedding, GroupNorm, 3x3 convolutions with one row of zero padding, a 1x1 or no shortcut)."""

    def conv3(conv: nn.Module) -> bool:
        return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros")

    shortcut = block.conv_shortcut
    return (block.upsample is None and block.downsample is None and block.time_embedding_norm == "default"
            and isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm)
            and block.norm1.affine and block.norm2.affine and conv3(block.conv1) and conv3(block.conv2)
            and (shortcut is None or (isinstance(shortcut, nn.Conv2d) and shortcut.kernel_size == (1, 1)
                                      and shortcut.stride == (1, 1) and shortcut.padding == (0, 0))))


def _affine(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel `scale, shift` with `norm(x) == x * scale + shift` (`[N, C, 1, 1]` each)."""
    batch, channels = x.shape[:2]
    groups = norm.num_groups
    variance, mean = torch.var_mean(x.reshape(batch, groups, -1), dim=-1, unbiased=False)
    rstd = torch.rsqrt(variance + norm.eps)
    scale = rstd.repeat_interleave(channels // groups, dim=1) * norm.weight
    shift = norm.bias - mean.repeat_interleave(channels // groups, dim=1) * scale
    return scale[:, :, None, None], shift[:, :, None, None]


def _normalised_conv(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor], activation: nn.Module,
                     conv: nn.Conv2d, start: int, stop: int) -> torch.Tensor:
    """`conv(activation(norm(x)))` for output rows `[start, stop)`: normalises one row more each side
    (zero rows at the image's edges, which is the convolution's own padding) and convolves the slab
    without row padding."""
    height = x.shape[-2]
    lo, hi = max(0, start - 1), min(height, stop + 1)
    scale, shift = norm
    slab = activation(torch.addcmul(shift, x[..., lo:hi, :], scale))
    if lo == start or hi == stop:
        zeros = slab.new_zeros((*slab.shape[:-2], 1, slab.shape[-1]))
        slab = torch.cat([zeros] * (lo == start) + [slab] + [zeros] * (hi == stop), dim=-2)
    return F.conv2d(slab, conv.weight, conv.bias, 1, (0, 1))


def forward_in_bands(block: ResnetBlock2D, input_tensor: torch.Tensor, temb: torch.Tensor | None,
                     band_rows: int) -> torch.Tensor:
    """`block(input_tensor, temb)` computed in bands of `band_rows` rows (see the module docstring);
    `block` must satisfy `supports_bands`."""
    height = input_tensor.shape[-2]
    norm1 = _affine(block.norm1, input_tensor)
    hidden = None
    for start, stop in row_slices(height, band_rows):
        piece = _normalised_conv(input_tensor, norm1, block.nonlinearity, block.conv1, start, stop)
        if hidden is None:
            hidden = piece.new_empty((*piece.shape[:-2], height, piece.shape[-1]))
        hidden[..., start:stop, :] = piece
        del piece
    if block.time_emb_proj is not None and temb is not None:
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        hidden += block.time_emb_proj(temb)[:, :, None, None]
    norm2 = _affine(block.norm2, hidden)
    out = None
    for start, stop in row_slices(height, band_rows):
        piece = _normalised_conv(hidden, norm2, block.nonlinearity, block.conv2, start, stop)
        shortcut = input_tensor[..., start:stop, :]
        if block.conv_shortcut is not None:
            shortcut = block.conv_shortcut(shortcut)
        piece = (shortcut + piece) / block.output_scale_factor
        if out is None:
            out = piece.new_empty((*piece.shape[:-2], height, piece.shape[-1]))
        out[..., start:stop, :] = piece
        del piece, shortcut
    return out
