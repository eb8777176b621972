"""Paired image error of the benchmarks: PSNR and SSIM (gaussian window) in torch."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mse(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of `image` against `reference`, in float64."""
    return float(((image.double() - reference.double()) ** 2).mean())


def psnr_of_mse(error: float, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error (inf for 0)."""
    return math.inf if error == 0 else 10 * math.log10(data_range ** 2 / error)


def _gaussian_window(size: int, sigma: float, channels: int, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004: gaussian window σ=1.5, K1=0.01, K2=0.03) of images
    `[C, H, W]` or `[B, C, H, W]`, per channel over the valid window positions."""
    x, y = (t.double() if t.dim() == 4 else t.double()[None] for t in (image, reference))
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size, sigma, channels, torch.float64)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(score.mean())
