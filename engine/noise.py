"""A stream's fixed per-slot noise from one seed or a weighted blend of seeds, and the mix of a seed fade.

Seeds ε_i are independent standard normal draws, so Σ w_i·ε_i has variance Σ w_i²: dividing by ‖w‖₂ gives
unit variance again, ε = Σ w_i·ε_i / ‖w‖₂, whatever the weights. One seed of weight 1 is that seed's own noise,
bit for bit. A fade from ε_a to ε_b is the blend of the two with weights (1 − t, t).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def seeded_noise(seed: int, shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise of `shape` from `seed` (on the CPU in float32, identical on every machine)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def blend_noise(noises: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i·ε_i / ‖w‖₂: unit variance for independent standard normal `noises` (see the module docstring).

    Raises:
        ValueError: no noise, or weights that are all zero.
    """
    norm = math.sqrt(sum(weight * weight for weight in weights))
    if not noises or norm == 0:
        raise ValueError("blending noise needs at least one noise with a non-zero weight")
    total = noises[0] * weights[0]
    for noise, weight in zip(noises[1:], weights[1:], strict=True):
        total = total + noise * weight
    return total / norm


def weighted_seed_noise(seeds: Sequence[tuple[int, float]], shape: Sequence[int]) -> torch.Tensor:
    """The fixed noise of weighted `seeds` ((seed, weight) pairs): `blend_noise` of each seed's `seeded_noise`."""
    return blend_noise([seeded_noise(seed, shape) for seed, _ in seeds], [weight for _, weight in seeds])


def mix_noise(source: torch.Tensor, target: torch.Tensor, t: float) -> torch.Tensor:
    """A seed fade `t` of the way from `source` to `target`: ((1 − t)·ε_a + t·ε_b) / √((1 − t)² + t²), exactly
    `target` at t = 1 (unit variance throughout when the two are independent)."""
    return blend_noise([source, target], [1.0 - t, t])
