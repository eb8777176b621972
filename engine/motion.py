"""Optical flow between frames and warping along it: the motion primitives of temporal steadiness.

Pure functions. Flow is estimated with OpenCV on 8-bit luminance (Farneback by default, DIS on request);
pixels without a trustworthy flow (occluded, uncovered, or carried out of the picture) are found by the
forward-backward consistency test of Sundaram et al. (ECCV 2010). `engine.temporal` uses them to carry the
previous output along the input's motion; `benchmarks.temporal_metrics` to measure flicker the same way.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

#: Flow estimators: OpenCV's Farneback (dense polynomial expansion) and DIS (dense inverse search, faster).
FLOW_METHODS: tuple[str, ...] = ("farneback", "dis")
#: Forward-backward consistency (Sundaram et al. 2010): a round trip p -> p + b(p) -> + f(p + b(p)) may miss p
#: by at most `CONSISTENCY_RELATIVE` of the two vectors' squared lengths plus `CONSISTENCY_ABSOLUTE` px².
CONSISTENCY_RELATIVE = 0.01
CONSISTENCY_ABSOLUTE = 0.5


def gray(frame: np.ndarray) -> np.ndarray:
    """The uint8 luminance of an RGB frame (H, W, 3) on the 0-255 scale (what the flow estimators take)."""
    rgb = np.clip(np.asarray(frame, np.float32), 0, 255).round().astype(np.uint8)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def optical_flow(source: np.ndarray, target: np.ndarray, method: str = "farneback") -> np.ndarray:
    """Dense flow from `source` to `target`: per pixel p of `source`, `source(p) ≈ target(p + flow(p))`.

    Args:
        source (`np.ndarray`): RGB frame (H, W, 3) on the 0-255 scale, or its luminance (H, W) uint8.
        target (`np.ndarray`): a frame of the same size and kind.
        method (`str`, defaults to `"farneback"`): one of `FLOW_METHODS`.

    Returns:
        `np.ndarray`: (H, W, 2) float32 offsets (dx, dy) in pixels.
    """
    a = source if source.ndim == 2 else gray(source)
    b = target if target.ndim == 2 else gray(target)
    if method == "farneback":
        # OpenCV's documented example settings: 3 pyramid levels halving, 15 px windows, 3 iterations.
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    if method == "dis":
        return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(a, b, None)
    raise ValueError(f"`method` must be one of {FLOW_METHODS}, got {method!r}")


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs, ys


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """`image` resampled along `flow`: `out(p) = image(p + flow(p))`, bilinear, as float32.

    Samples outside `image` repeat its border; `occlusion_mask` marks them untrustworthy.
    """
    xs, ys = _grid(*flow.shape[:2])
    return cv2.remap(np.asarray(image, np.float32), xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def lands_inside(flow: np.ndarray) -> np.ndarray:
    """Where `p + flow(p)` lies inside the picture (what enters at a border has no past)."""
    height, width = flow.shape[:2]
    xs, ys = _grid(height, width)
    tx, ty = xs + flow[..., 0], ys + flow[..., 1]
    return (tx >= 0) & (tx <= width - 1) & (ty >= 0) & (ty <= height - 1)


def occlusion_mask(flow: np.ndarray, reverse: np.ndarray) -> np.ndarray:
    """Where `flow` (frame B to frame A) is trustworthy, given `reverse` (A to B).

    A pixel p of B passes when p + flow(p) lies inside A and going back along `reverse` from there returns
    to p within the consistency tolerance. Pixels uncovered in B (disocclusions, including what enters at
    the borders) and occluded ones fail the round trip or leave the picture.
    """
    inside = lands_inside(flow)
    back = warp(reverse, flow)
    miss = ((flow + back) ** 2).sum(-1)
    tolerance = CONSISTENCY_RELATIVE * ((flow ** 2).sum(-1) + (back ** 2).sum(-1)) + CONSISTENCY_ABSOLUTE
    return inside & (miss <= tolerance)


def sampling_grid(flow: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`flow` (H, W, 2) in pixels as a `grid_sample` grid (1, H, W, 2) in [-1, 1] (`align_corners=True`)."""
    height, width = flow.shape[:2]
    xs, ys = _grid(height, width)
    grid = np.stack([(xs + flow[..., 0]) * (2 / max(width - 1, 1)) - 1,
                     (ys + flow[..., 1]) * (2 / max(height - 1, 1)) - 1], axis=-1)
    return torch.from_numpy(grid).to(device=device, dtype=dtype)[None]


def warp_tensor(images: torch.Tensor, grid: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """`images` (N, C, H, W) resampled along `grid` (from `sampling_grid`), border repeated: the tensor twin
    of `warp`, so the engine warps on the device its outputs are on. `mode`: `bilinear` or `bicubic`.

    Sampled in the grid's dtype and returned in the images': a grid belongs in float32 (see `sampling_grid`).
    """
    warped = F.grid_sample(images.to(grid.dtype), grid.expand(images.shape[0], -1, -1, -1), mode=mode,
                           padding_mode="border", align_corners=True)
    return warped.to(images.dtype)
