"""A synthetic moving pattern for live clients and load tests (no camera, no files, numpy only)."""

from __future__ import annotations

import math

import numpy as np


def draw_disc(frame: np.ndarray, cx: float, cy: float, radius: float, colour: tuple[int, int, int]) -> None:
    """Paint a filled disc of `colour` centred at (`cx`, `cy`) into the RGB uint8 `frame`, in place."""
    height, width = frame.shape[:2]
    ys, xs = np.ogrid[0:height, 0:width]
    frame[(xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2] = colour


def moving_pattern(index: int, width: int = 128, height: int = 128) -> np.ndarray:
    """Frame `index` of an endless slowly moving pattern, RGB uint8 `[height, width, 3]`."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = index / 15.0
    red = 0.5 + 0.5 * np.sin(xs / 11.0 + t)
    green = 0.5 + 0.5 * np.sin(ys / 13.0 - 0.7 * t)
    blue = 0.5 + 0.5 * np.sin((xs + ys) / 17.0 + 0.3 * t)
    frame = (np.stack([red, green, blue], -1) * 255).astype(np.uint8)
    draw_disc(frame, width / 2 + width / 3 * math.cos(t), height / 2 + height / 3 * math.sin(t),
              min(width, height) / 10, (250, 250, 250))
    return frame
