"""Per-stream features as parts: what a `StreamEngine` loops over instead of wiring each feature in by hand.

A part is one optional feature of one stream (a skip policy, temporal steadiness, the ControlNet's control
images and residual reuse, prompt and seed transitions). Each implements `StreamPart`, lives in its own module
and reads its own section of `StreamConfig`; the stream keeps the state and the three stages and calls every part
at the same points: `check` before a config is taken (at start and on every update, so a bad one changes
nothing), `update` when it is taken (`fresh` when the stream's earlier frames no longer fit it: a new prompt,
seed, steps or size), `primed` after the buffer was filled from one frame, `reset` when the stream forgets
everything it has seen. A new feature is one module here and its section of `StreamConfig`.
"""

from __future__ import annotations

from typing import Protocol

from ..config import StreamConfig


class StreamPart(Protocol):
    """One optional per-stream feature (see the package docstring)."""

    def check(self, config: StreamConfig, runner) -> None:
        """Raise `ValueError` when the stream cannot run `config` with this part on `runner` (nothing changes)."""

    def update(self, old: StreamConfig, new: StreamConfig, runner, fresh: bool) -> None:
        """Take `new` (already checked) on `runner`, between two frames with the stream's locks held; with `fresh`,
        drop whatever was kept from earlier frames."""

    def primed(self, config: StreamConfig) -> None:
        """The buffer was just filled from one frame (n - 1 priming calls on garbage rows): keep nothing of them."""

    def reset(self) -> None:
        """The stream forgets every frame seen."""
