"""`rehash`: DeepCache on the frame axis (Streamlined Inference's step rehash, arXiv 2411.01171).

Each slot keeps the deep UNet output (the input of the last up block) from its last full compute.
Every frame the shallow head and tail run on every row; the deep part runs only on the rows of slots
that are due: every `rehash_interval` frames with the slots' phases staggered (slot k has phase k mod R,
so each frame costs about the same), or earlier when the change guard forces it (a cut, accumulated
drift, the maximum age). The deep part runs on exactly those rows (gathered), and its output is
scattered into the cache, so skipped rows cost nothing in the deep blocks.
"""

from __future__ import annotations

import torch

from ..config import SkipSettings
from ..prompt import Conditioning
from .base import SkipPolicy, SlotFrame, gather_conditioning
from .unet_split import check_supported, run_deep, run_head, run_tail


class RehashPolicy(SkipPolicy):
    """Per-slot deep-feature cache of one stream.

    Args:
        unet (`UNet2DConditionModel`): the shared UNet (never modified).
        settings (`SkipSettings`): thresholds; `rehash_interval` is R.
    """

    def __init__(self, unet: torch.nn.Module, settings: SkipSettings):
        check_supported(unet)
        super().__init__(unet, settings)
        self._clear_caches()

    def _clear_caches(self) -> None:
        self.deep_cache: torch.Tensor | None = None
        self.cache_key: tuple[int, ...] | None = None
        self.frame_index = 0

    def due_slot_rows(self, frame: SlotFrame) -> torch.Tensor:
        """Slot rows whose staggered schedule asks for the deep part this frame."""
        f, interval = frame.schedule.frames_per_slot, self.settings.rehash_interval
        slots = torch.arange(frame.x_t.shape[0], device=frame.x_t.device) // f
        return (self.frame_index + slots % interval) % interval == 0

    @torch.no_grad()
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
             frame: SlotFrame) -> torch.Tensor:
        unet = self.unet_module
        forced = self.guard.observe(frame)
        fresh_slot_rows = forced | self.due_slot_rows(frame)
        slot_of_row = frame.unet_rows_to_slot_rows(latents.shape[0])
        head = run_head(unet, latents, timesteps, conditioning)
        if self.deep_cache is None or self.cache_key != tuple(latents.shape):
            fresh_slot_rows = torch.ones_like(fresh_slot_rows)
            self.cache_key = tuple(latents.shape)
        fresh_rows = fresh_slot_rows[slot_of_row]
        computed = int(fresh_rows.sum())
        if computed == latents.shape[0]:
            deep = run_deep(unet, head, conditioning)
        else:
            deep = self.deep_cache
            if computed:
                index = fresh_rows.nonzero().squeeze(1)
                fresh = run_deep(unet, head.rows(index), gather_conditioning(conditioning, index))
                deep = deep.index_copy(0, index, fresh)
        self.deep_cache = deep
        self.guard.computed(fresh_slot_rows)
        self.last_full = fresh_slot_rows
        self.stats.count(latents.shape[0], computed)
        self.stats.slot_rows += int(fresh_slot_rows.numel())
        self.stats.full_slot_rows += int(fresh_slot_rows.sum())
        self.frame_index += 1
        return run_tail(unet, head, deep, conditioning)
