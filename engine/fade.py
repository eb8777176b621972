"""A transition over a number of frames: a prompt or a seed fading from what the stream showed to what it was
asked for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Fade(Generic[T]):
    """From `source` to `target` over `frames` frames: the k-th frame after the change is k/frames of the way.

    Args:
        source (`T`): what the stream showed when the change came (itself possibly mid-fade).
        target (`T`): what it was asked for; the last frame of the fade shows exactly this.
        frames (`int`): length of the fade, >= 1.
    """

    source: T
    target: T
    frames: int
    done: int = 0

    def __post_init__(self) -> None:
        if self.frames < 1:
            raise ValueError(f"a fade lasts at least one frame, got {self.frames}")

    def advance(self) -> float:
        """Count one more frame; its progress t in (0, 1]."""
        self.done = min(self.done + 1, self.frames)
        return self.done / self.frames

    @property
    def finished(self) -> bool:
        """Whether the last frame of the fade was counted."""
        return self.done >= self.frames
