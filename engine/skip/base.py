"""What every skip policy shares: the slot view of a frame, the noise-free change guard and counters.

A skip policy replaces the engine's one UNet call per frame (`NetworkRunner.unet`) with a call that
reuses, per stream-batch slot, work done on an earlier frame at the same slot. Slots are rows of the
stream batch, slot-major: row `k * frame_buffer_size + j` is frame j of slot k; the UNet batch may hold
extra negative-prompt rows (`full`, `initialize` guidance) that follow their slot's decision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..config import SkipSettings
from ..prompt import Conditioning, KVCache
from ..schedule import SlotSchedule


@dataclass(frozen=True)
class SlotFrame:
    """The stream batch of one call, before guidance expands it.

    Args:
        x_t (`torch.Tensor`): noisy latents, one row per slot row (`[n * f, C, h, w]`).
        schedule (`SlotSchedule`): the per-row α, β and timesteps.
        noise (`torch.Tensor`): the stream's fixed per-row noise ε, shaped like `x_t`.
    """

    x_t: torch.Tensor
    schedule: SlotSchedule
    noise: torch.Tensor

    def clean_latents(self) -> torch.Tensor:
        """ŝ_k = (x_t^k − β_k·ε_k)/α_k: each slot's latent with its known noise removed."""
        return (self.x_t - self.schedule.beta * self.noise) / self.schedule.alpha

    def unet_rows_to_slot_rows(self, unet_rows: int) -> torch.Tensor:
        """For each row of the guidance-expanded UNet batch, the slot row it belongs to."""
        slot_rows, f = self.x_t.shape[0], self.schedule.frames_per_slot
        own = torch.arange(slot_rows, device=self.x_t.device)
        if unet_rows == slot_rows:
            return own
        if unet_rows == 2 * slot_rows:  # `full`: negative rows first, one per slot row
            return torch.cat([own, own])
        if unet_rows == slot_rows + f:  # `initialize`: one extra negative slot for the newest frames
            return torch.cat([own[:f], own])
        raise ValueError(f"a UNet batch of {unet_rows} rows does not match {slot_rows} slot rows")


@dataclass
class SkipStats:
    """Rows of skippable work requested and actually computed since the last reset.

    A row is one UNet batch row through one cacheable unit (the deep part for `rehash`, one block
    for `adacache`); `skip_rate` is the fraction not computed.
    """

    rows_total: int = 0
    rows_computed: int = 0
    full_slot_rows: int = 0
    slot_rows: int = 0

    @property
    def skip_rate(self) -> float:
        return 1.0 - self.rows_computed / self.rows_total if self.rows_total else 0.0

    def count(self, total: int, computed: int) -> None:
        self.rows_total += total
        self.rows_computed += computed


def relative_l1(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row: |a − b|₁ / |reference|₁ (a tiny floor keeps an all-zero reference finite), in float32.

    The sums run in float32 whatever the latents' dtype: a float16 sum over a 1024² frame's 65,536 latent
    values of magnitude ~1 passes float16's largest value (65,504): the ratio became 0 (or NaN), so the guard saw
    no change, and no cut, at large sizes.
    """
    dims = tuple(range(1, a.dim()))
    return (a - b).abs().sum(dims, dtype=torch.float32) / \
        reference.abs().sum(dims, dtype=torch.float32).clamp_min(1e-12)


class ChangeGuard:
    """Per slot row: the noise-free change since the slot's last full compute, and when to force one.

    A full compute is forced when δ = |ŝ − ŝ_ref|₁/|ŝ_ref|₁ exceeds the cut threshold, when the
    frame-to-frame changes since the reference add up past the accumulated threshold, when the slot
    reached the maximum age, or when there is no reference yet. A frame that was a cut where it was
    detected stays one through every later slot it moves to (the stream batch shifts rows by
    `frames_per_slot` per call): its content is new at every step, even where x̂0 of a later step
    hides the change.
    """

    def __init__(self, settings: SkipSettings):
        self.settings = settings
        self.reset()

    def reset(self) -> None:
        self.reference: torch.Tensor | None = None
        self.previous: torch.Tensor | None = None
        self.accumulated: torch.Tensor | None = None
        self.age: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None
        self.cuts: torch.Tensor | None = None

    def observe(self, frame: SlotFrame) -> torch.Tensor:
        """Record this frame's ŝ; returns the slot rows (bool mask) that must be computed in full."""
        clean = frame.clean_latents()
        rows = clean.shape[0]
        if self.reference is None or self.reference.shape != clean.shape:
            self.reference = clean.clone()
            self.accumulated = torch.zeros(rows, device=clean.device)
            self.age = torch.zeros(rows, dtype=torch.long, device=clean.device)
            self.delta = torch.zeros(rows, device=clean.device)
            self.cuts = torch.zeros(rows, dtype=torch.bool, device=clean.device)
            self.previous = clean
            return torch.ones(rows, dtype=torch.bool, device=clean.device)
        self.delta = relative_l1(clean, self.reference, self.reference)
        self.accumulated = self.accumulated + relative_l1(clean, self.previous, self.reference)
        self.age = self.age + 1
        self.previous = clean
        s, f = self.settings, frame.schedule.frames_per_slot
        carried = torch.zeros_like(self.cuts)
        carried[f:] = self.cuts[:-f]
        self.cuts = (self.delta > s.cut_threshold) | carried
        return self.cuts | (self.accumulated > s.accumulated_threshold) | (self.age >= s.max_age)

    def computed(self, rows: torch.Tensor) -> None:
        """Rows (bool mask) computed in full this frame become the new references."""
        self.reference = torch.where(rows.view(-1, 1, 1, 1), self.previous, self.reference)
        self.accumulated = torch.where(rows, torch.zeros_like(self.accumulated), self.accumulated)
        self.age = torch.where(rows, torch.zeros_like(self.age), self.age)


def gather_conditioning(conditioning: Conditioning, rows: torch.Tensor) -> Conditioning:
    """The conditioning of the UNet rows `rows` (indices): embeddings, every cached K/V and SDXL's added inputs."""
    kv: KVCache | None = None
    if conditioning.kv_cache is not None:
        kv = {name: (key[rows], value[rows]) for name, (key, value) in conditioning.kv_cache.items()}
    added = None
    if conditioning.added_cond is not None:
        added = {name: value[rows] for name, value in conditioning.added_cond.items()}
    return Conditioning(conditioning.encoder_hidden_states[rows], kv, added)


class SkipPolicy(ABC):
    """A per-stream policy the engine consults around its UNet call; holds that stream's caches only."""

    def __init__(self, unet: torch.nn.Module, settings: SkipSettings):
        self.unet_module = unet
        self.settings = settings
        self.stats = SkipStats()
        self.guard = ChangeGuard(settings)
        # Slot rows computed in full by the last call (bool mask), for tests and diagnostics.
        self.last_full: torch.Tensor | None = None

    def update_settings(self, settings: SkipSettings) -> None:
        """New thresholds take effect from the next frame; caches stay valid."""
        self.settings = settings
        self.guard.settings = settings

    def reset(self) -> None:
        """Forget every cached feature and reference (the next frame is computed in full)."""
        self.guard.reset()
        self.last_full = None
        self._clear_caches()

    @abstractmethod
    def _clear_caches(self) -> None:
        """Drop the policy's own feature caches."""

    @abstractmethod
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
             frame: SlotFrame) -> torch.Tensor:
        """The ε prediction for the guidance-expanded batch, reusing cached work where the policy allows."""
