"""Paired image error: PSNR and SSIM in torch, the one implementation the benchmarks and the demo model's
evaluation share."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Window side of each SSIM window kind (shrunk to the image when it is smaller).
SSIM_WINDOWS = {"gaussian": 11, "uniform": 7}


def mse(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of `image` against `reference`, in float64."""
    return float(((image.double() - reference.double()) ** 2).mean())


def psnr_of_mse(error: float, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error (inf for 0)."""
    return math.inf if error == 0 else 10 * math.log10(data_range ** 2 / error)


def _window(kind: str, size: int, channels: int) -> torch.Tensor:
    if kind == "gaussian":
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        weights = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
        weights = weights / weights.sum()
    else:
        weights = torch.full((size,), 1 / size, dtype=torch.float64)
    return (weights[:, None] * weights[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, window: str = "gaussian") -> float:
    """Mean structural similarity (Wang et al. 2004, K1=0.01, K2=0.03) of images `[C, H, W]` or `[B, C, H, W]`,
    per channel over the valid window positions.

    Args:
        image (`torch.Tensor`): the image to score.
        reference (`torch.Tensor`): the image it should be, same shape.
        data_range (`float`, defaults to 1.0): the value range (255 for uint8 images).
        window (`str`, defaults to `"gaussian"`): `gaussian` is Wang et al.'s 11×11 window with σ=1.5 and
            population statistics (scikit-image with `gaussian_weights=True, use_sample_covariance=False`);
            `uniform` is a 7×7 mean with sample (co)variances, scikit-image's `structural_similarity` defaults.
    """
    if window not in SSIM_WINDOWS:
        raise ValueError(f"`window` must be one of {tuple(SSIM_WINDOWS)}, got {window!r}")
    x, y = (t.double() if t.dim() == 4 else t.double()[None] for t in (image, reference))
    channels = x.shape[1]
    size = min(SSIM_WINDOWS[window], x.shape[-1], x.shape[-2])
    kernel = _window(window, size, channels)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    if window == "uniform":
        unbiased = size * size / (size * size - 1)
        var_x, var_y, cov = var_x * unbiased, var_y * unbiased, cov * unbiased
    score = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(score.mean())
