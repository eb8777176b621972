"""Stochastic similarity filter (StreamDiffusion §3.5): skip near-duplicate input frames."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def skip_probability(cosine: float, threshold: float) -> float:
    """P(skip) = max(0, 1 − (1 − cos)/(1 − η))."""
    return max(0.0, 1.0 - (1.0 - cosine) / (1.0 - threshold))


def frame_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two frames, flattened."""
    return float(F.cosine_similarity(a.reshape(1, -1).float(), b.reshape(1, -1).float()).item())


@dataclass
class SimilarityFilter:
    """Decides per frame whether to skip it; holds the last processed input and the skip streak.

    Args:
        threshold (`float`): η; frames at cosine similarity η or below are never skipped.
        max_skip_frames (`int`): at most this many consecutive frames are skipped.
        seed (`int`): seed of the filter's own random draws, so runs repeat.
    """

    threshold: float = 0.98
    max_skip_frames: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        self._reference: torch.Tensor | None = None
        self._streak = 0
        self._generator = torch.Generator().manual_seed(self.seed)

    def should_skip(self, frame: torch.Tensor) -> bool:
        """Whether to skip `frame`; a processed frame becomes the new reference."""
        if self._reference is not None and self._streak < self.max_skip_frames:
            probability = skip_probability(frame_cosine(frame, self._reference), self.threshold)
            if probability > 0 and float(torch.rand(1, generator=self._generator)) < probability:
                self._streak += 1
                return True
        self._reference = frame.detach().clone()
        self._streak = 0
        return False

    def reset(self) -> None:
        """Forget the reference frame (after a re-prepare)."""
        self._reference = None
        self._streak = 0
