"""Synthetic moving test clips (no camera, no files): shared by the benchmarks, the demo clip and the tests.

The live clients' endless pattern is `client.patterns.moving_pattern`; its disc is drawn the same way here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from client.patterns import draw_disc
from engine.codec import rgb_to_tensor

CLIP_KINDS: tuple[str, ...] = ("static", "slow_pan", "fast_motion", "hard_cut")


def _scene(width: int, height: int, variant: int) -> np.ndarray:
    """A smooth, textured RGB scene twice the frame size, so a window can pan across it."""
    rng = np.random.default_rng(variant)
    ys, xs = np.mgrid[0:2 * height, 0:2 * width].astype(np.float32)
    image = np.zeros((2 * height, 2 * width, 3), np.float32)
    for channel in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.5, 4.0, size=2) * 2 * math.pi / (2 * width)
            phase = rng.uniform(0, 2 * math.pi)
            image[..., channel] += np.sin(xs * fx + ys * fy + phase)
    image = (image - image.min()) / (image.max() - image.min())
    return (image * 255).astype(np.uint8)


def synthetic_clip(kind: str, num_frames: int, width: int = 128, height: int = 128, seed: int = 0) -> list[np.ndarray]:
    """RGB uint8 frames (H, W, 3) of one motion category.

    `static`: identical frames. `slow_pan`: the camera drifts a pixel per frame (no two frames alike). `fast_motion`:
    a fast pan with a moving object. `hard_cut`: a slow pan that cuts to another scene halfway.
    """
    if kind not in CLIP_KINDS:
        raise ValueError(f"`kind` must be one of {CLIP_KINDS}, got {kind!r}")
    scenes = [_scene(width, height, seed), _scene(width, height, seed + 1)]
    speed = {"static": 0.0, "slow_pan": 1.0, "fast_motion": 6.0, "hard_cut": 1.0}[kind]
    # The window swings across the scene; dividing by the swing's amplitude makes `speed` its pixels per
    # frame horizontally (half that vertically) near the centre.
    reach_x, reach_y = max(1.0, width / 2 - 1), max(1.0, height / 2 - 1)
    frames = []
    for index in range(num_frames):
        scene = scenes[1] if kind == "hard_cut" and index >= num_frames // 2 else scenes[0]
        offset = speed * index
        x = int(round(width / 2 + reach_x * math.sin(offset / reach_x)))
        y = int(round(height / 2 + reach_y * math.sin(offset / (2 * reach_y))))
        frame = scene[y:y + height, x:x + width].copy()
        if kind == "fast_motion":
            draw_disc(frame, (index * 9) % width, height / 2, height / 8, (255, 64, 32))
        frames.append(frame)
    return frames


def tensor_clip(kind: str, num_frames: int, width: int = 128, height: int = 128) -> list[torch.Tensor]:
    """`synthetic_clip` as the engine's input: `[3, H, W]` float tensors in [0, 1]."""
    return [rgb_to_tensor(frame) for frame in synthetic_clip(kind, num_frames, width, height)]
