"""`adacache`: per-slot residual caching with a content-adaptive schedule (AdaCache, arXiv 2411.02397).

Between a fresh head and tail (the first down block and the last up block), every ResNet,
self-attention, cross-attention and feed-forward unit caches its residual per UNet row
(`residual_blocks`). A slot row is computed in full every N frames; on each full compute the change of
the mid block's residual per frame since the previous full compute, regularised by the motion of the
slot's input frame (MoReg: × (1 + motion / `adacache_motion_scale`)), picks the next N from the
codebook. Cross-attention residuals live `adacache_cross_attention_factor` times longer (PAB,
arXiv 2408.12588). The change guard (`ChangeGuard`) overrides all of it: a cut, accumulated drift or
the maximum age recomputes the slot, cross-attention included on a cut.
"""

from __future__ import annotations

from collections import deque

import torch

from ..config import SkipSettings
from ..prompt import Conditioning
from .base import SkipPolicy, SlotFrame, relative_l1
from .residual_blocks import CROSS, MAIN, ResidualPass, deep_units, wrapped_units
from .unet_split import check_supported


def codebook_frames(change: torch.Tensor, codebook: tuple[tuple[float, int], ...]) -> torch.Tensor:
    """Frames until the next full compute for each change: the first entry whose bound is >= it, else 1."""
    bounds = torch.tensor([bound for bound, _ in codebook], dtype=change.dtype, device=change.device)
    frames = torch.tensor([frames for _, frames in codebook] + [1], dtype=torch.long, device=change.device)
    return frames[torch.searchsorted(bounds, change.contiguous(), right=False)]


class AdaCachePolicy(SkipPolicy):
    """Per-slot residual caches and compute schedule of one stream.

    Args:
        unet (`UNet2DConditionModel`): the shared UNet; wrappers are on it only during this policy's calls.
        settings (`SkipSettings`): thresholds, codebook, motion scale and cross-attention factor.
    """

    def __init__(self, unet: torch.nn.Module, settings: SkipSettings):
        check_supported(unet)
        super().__init__(unet, settings)
        self.units = deep_units(unet)
        self._clear_caches()

    def _clear_caches(self) -> None:
        self.caches: dict[str, torch.Tensor] = {}
        self.last_cross: torch.Tensor | None = None
        self.cache_key: tuple[int, ...] | None = None
        self.next_compute: torch.Tensor | None = None
        self.cross_age: torch.Tensor | None = None
        self.mid_reference: torch.Tensor | None = None
        self.last_change: torch.Tensor | None = None
        self.motion_history: deque[torch.Tensor] = deque()
        self.previous_input: torch.Tensor | None = None

    def _slot_motion(self, frame: SlotFrame) -> torch.Tensor:
        """Per slot row: the relative L1 change of the input latent that frame brought in (0 if unknown)."""
        f = frame.schedule.frames_per_slot
        rows = frame.x_t.shape[0]
        newest = frame.clean_latents()[:f]  # slot 0's ŝ is exactly the new frames' encoded latents
        if self.previous_input is None:
            motion = torch.zeros(f, device=newest.device)
        else:
            motion = relative_l1(newest, self.previous_input, self.previous_input)
        self.previous_input = newest
        self.motion_history.appendleft(motion)
        while len(self.motion_history) > rows // f:
            self.motion_history.pop()
        per_slot = list(self.motion_history) + [torch.zeros_like(motion)] * (rows // f - len(self.motion_history))
        return torch.cat(per_slot)

    @torch.no_grad()
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
             frame: SlotFrame) -> torch.Tensor:
        slot_rows, unet_rows = frame.x_t.shape[0], latents.shape[0]
        forced = self.guard.observe(frame)
        motion = self._slot_motion(frame)
        if self.cache_key != tuple(latents.shape):
            self._clear_schedule(tuple(latents.shape), slot_rows, latents.device)
            forced = torch.ones_like(forced)
        self.cross_age += 1
        main = forced | (self.guard.age >= self.next_compute)
        lifetime = self.settings.adacache_cross_attention_factor * self.next_compute.clamp_max(self.settings.max_age)
        cross = self.guard.cuts | (self.cross_age >= lifetime)
        if not self.caches:
            cross = torch.ones_like(cross)
        slot_of_row = frame.unet_rows_to_slot_rows(unet_rows)
        context = ResidualPass({MAIN: main[slot_of_row], CROSS: cross[slot_of_row]}, self.caches, self.stats)
        with wrapped_units(self.unet_module, self.units, context):
            output = self.unet_module(latents, timesteps, return_dict=False, **conditioning.unet_kwargs())[0]
        self._schedule_next(context.mid_residual, main, slot_of_row, motion)
        self.guard.computed(main)
        self.last_full, self.last_cross = main, cross
        self.cross_age = torch.where(cross, torch.zeros_like(self.cross_age), self.cross_age)
        self.stats.slot_rows += slot_rows
        self.stats.full_slot_rows += int(main.sum())
        return output

    def _clear_schedule(self, key: tuple[int, ...], slot_rows: int, device: torch.device) -> None:
        self.caches.clear()
        self.cache_key = key
        self.next_compute = torch.ones(slot_rows, dtype=torch.long, device=device)
        self.cross_age = torch.zeros(slot_rows, dtype=torch.long, device=device)
        self.mid_reference = None
        self.last_change = torch.full((slot_rows,), float("inf"), device=device)

    def _schedule_next(self, mid_residual: torch.Tensor, main: torch.Tensor, slot_of_row: torch.Tensor,
                       motion: torch.Tensor) -> None:
        """On the rows just computed in full: mid-block residual change per frame × MoReg → codebook."""
        if self.mid_reference is None:
            self.mid_reference = mid_residual
            return
        fresh_rows = main[slot_of_row]
        ages = self.guard.age.clamp_min(1).to(mid_residual.dtype)
        change_rows = relative_l1(mid_residual, self.mid_reference, self.mid_reference) / ages[slot_of_row]
        change = torch.zeros_like(self.last_change).scatter_reduce(0, slot_of_row, change_rows, "amax",
                                                                   include_self=False)
        regularised = change * (1 + motion / self.settings.adacache_motion_scale)
        frames = codebook_frames(regularised, self.settings.adacache_codebook)
        self.next_compute = torch.where(main, frames, self.next_compute)
        self.last_change = torch.where(main, regularised, self.last_change)
        self.mid_reference = torch.where(fresh_rows.view(-1, 1, 1, 1), mid_residual, self.mid_reference)
