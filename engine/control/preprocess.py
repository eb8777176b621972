"""Preprocessors: an input frame to the control image a diffusers ControlNet reads.

A frame is either what the server decodes, an RGB uint8 array `(H, W, 3)`, or what the engine takes, a
float tensor `[3, H, W]` in [0, 1]. Every preprocessor returns the control image in the representation
diffusers' ControlNet pipelines feed their ControlNets: a float tensor `[3, H, W]` in [0, 1] (no [-1, 1]
normalisation), at the frame's size. For a tensor frame it is on the frame's device and in its dtype; for
an array frame it is float32 on the CPU. All functions are pure, and raise `ValueError` naming the
argument that is wrong.
"""

from __future__ import annotations

import math
from numbers import Real

import cv2
import numpy as np
import torch

from ..codec import rgb_to_tensor, tensor_to_rgb

__all__ = ["DEFAULT_HIGH_THRESHOLD", "DEFAULT_LOW_THRESHOLD", "canny", "image"]

# The thresholds of the canny examples that go with the public canny ControlNets (diffusers' docs,
# lllyasviel/sd-controlnet-canny): on webcam-like frames they keep object outlines and strong texture
# while dropping sensor noise and soft shading, which is what those ControlNets were trained on.
DEFAULT_LOW_THRESHOLD = 100
DEFAULT_HIGH_THRESHOLD = 200

Frame = np.ndarray | torch.Tensor


def _check_frame(frame: Frame) -> None:
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3 or 0 in frame.shape:
            raise ValueError(f"`frame` must be an RGB uint8 array (H, W, 3) or a float tensor [3, H, W] in [0, 1], "
                             f"got an array of dtype {frame.dtype} shaped {frame.shape}")
        return
    if not isinstance(frame, torch.Tensor):
        raise ValueError(f"`frame` must be an RGB uint8 array (H, W, 3) or a float tensor [3, H, W] in [0, 1], "
                         f"got {type(frame).__name__}")
    if not frame.is_floating_point() or frame.dim() != 3 or frame.shape[0] != 3 or 0 in frame.shape:
        raise ValueError(f"`frame` must be a float tensor [3, H, W] in [0, 1] (or an RGB uint8 array (H, W, 3)), "
                         f"got a {frame.dtype} tensor shaped {tuple(frame.shape)}")
    # A frame in [-1, 1] (the VAE's range) would give plausible-looking but wrong edges: refuse it.
    low, high = frame.aminmax()
    if not (0 <= float(low) and float(high) <= 1):
        raise ValueError(f"`frame` values must lie in [0, 1], got [{float(low):.3g}, {float(high):.3g}]")


def _check_threshold(name: str, value: Real) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


def canny(frame: Frame, low_threshold: float = DEFAULT_LOW_THRESHOLD,
          high_threshold: float = DEFAULT_HIGH_THRESHOLD) -> torch.Tensor:
    """Canny edges of the frame: white (1.0) one-pixel edges on black (0.0), repeated over 3 channels.

    OpenCV's `cv2.Canny` on the frame's grayscale image (`cv2.COLOR_RGB2GRAY`), with its default 3×3 Sobel
    aperture and L1 gradient norm. The thresholds are on that gradient magnitude of the 0–255 image:
    pixels above `high_threshold` start an edge, pixels above `low_threshold` continue one.

    Args:
        frame (`np.ndarray | torch.Tensor`): an RGB uint8 array `(H, W, 3)` or a float tensor `[3, H, W]`
            in [0, 1] (a tensor is rounded to 8 bits first, as the engine's codec does).
        low_threshold (`float`, defaults to 100): hysteresis low threshold, >= 0.
        high_threshold (`float`, defaults to 200): hysteresis high threshold, >= `low_threshold`.

    Returns:
        `torch.Tensor`: `[3, H, W]` with values 0 and 1.

    Raises:
        ValueError: `frame` is not such an image, or a threshold is negative, not finite, or
            `low_threshold` > `high_threshold`.
    """
    _check_frame(frame)
    low = _check_threshold("low_threshold", low_threshold)
    high = _check_threshold("high_threshold", high_threshold)
    if low > high:
        raise ValueError(f"`low_threshold` ({low:g}) must not exceed `high_threshold` ({high:g})")
    rgb = frame if isinstance(frame, np.ndarray) else tensor_to_rgb(frame)
    edges = cv2.Canny(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY), low, high)
    control = torch.from_numpy(edges).float().div_(255).expand(3, -1, -1).contiguous()
    if isinstance(frame, torch.Tensor):
        return control.to(device=frame.device, dtype=frame.dtype)
    return control


def image(frame: Frame) -> torch.Tensor:
    """The frame itself as a control image (for tile-like ControlNets).

    Args:
        frame (`np.ndarray | torch.Tensor`): an RGB uint8 array `(H, W, 3)` or a float tensor `[3, H, W]` in [0, 1].

    Returns:
        `torch.Tensor`: `[3, H, W]` in [0, 1]; a tensor frame is returned as it is (not copied).

    Raises:
        ValueError: `frame` is not such an image.
    """
    _check_frame(frame)
    return frame if isinstance(frame, torch.Tensor) else rgb_to_tensor(frame)
