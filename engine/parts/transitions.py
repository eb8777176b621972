"""Prompt and seed transitions (`prompt_transition_frames`, `seed_transition_frames`): a part that fades what the
stream showed into what it was asked for, one step a frame."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from ..conditioning import mix_prompt_states
from ..config import StreamConfig
from ..fade import Fade
from ..noise import mix_noise
from ..prompt import PromptState

T = TypeVar("T")


class Transitions:
    """One stream's running prompt and seed fades.

    The stream asks it which prompt to show (`prompt`) and lets it step once per frame (`step`); a change that
    should fade starts one (`fade_prompt`, `fade_noise`), a change that should not ends any running one.
    """

    def __init__(self, prompt: PromptState):
        self.prompt = prompt
        self.prompt_fade: Fade[PromptState] | None = None
        self.noise_fade: Fade[torch.Tensor] | None = None

    def check(self, config: StreamConfig, runner) -> None:
        """Every config can fade (`StreamConfig` bounds the lengths)."""

    def update(self, old: StreamConfig, new: StreamConfig, runner, fresh: bool) -> None:
        """Nothing to follow: fades start from the changes themselves (`fade_prompt`, `fade_noise`)."""

    def primed(self, config: StreamConfig) -> None:
        """Fades go on across a priming."""

    def fade_prompt(self, target: PromptState, frames: int) -> None:
        """Show `target` from now on: over `frames` frames from what shows now, or at once with 0."""
        self.prompt_fade = Fade(self.prompt, target, frames) if frames > 0 else None
        if frames == 0:
            self.prompt = target

    def fade_noise(self, current: torch.Tensor, target: torch.Tensor, frames: int) -> None:
        """Fade the fixed noise from `current` to `target` over `frames` frames (`step` writes each mix)."""
        self.noise_fade = Fade(current, target, frames)

    def stop_noise(self) -> None:
        """A new noise that must not fade (or a re-prepare): any running noise fade ends."""
        self.noise_fade = None

    def step(self, state) -> None:
        """One frame of each running fade: the frame about to run sees its next mix (`state.fixed_noise`)."""
        if self.prompt_fade is not None:
            self.prompt, self.prompt_fade = _advance(self.prompt_fade, mix_prompt_states)
        if self.noise_fade is not None:
            state.fixed_noise, self.noise_fade = _advance(self.noise_fade, mix_noise)

    def reset(self) -> None:
        """A reset: a running prompt fade ends at its target, a noise fade is dropped with the old state."""
        if self.prompt_fade is not None:
            self.prompt, self.prompt_fade = self.prompt_fade.target, None
        self.noise_fade = None


def _advance(fade: Fade[T], mix: Callable[[T, T, float], T]) -> tuple[T, Fade[T] | None]:
    """One frame of `fade`: what shows now (`mix` of its ends, exactly its target on the last frame), and the fade
    while it runs on (None once it is finished)."""
    t = fade.advance()
    if fade.finished:
        return fade.target, None
    return mix(fade.source, fade.target, t), fade
