"""ControlNet residuals and the control rows of a UNet call: the data that travels with a call's conditioning.

Pure data (no model code), so `engine.prompt.Conditioning` can carry residuals without importing the ControlNet
machinery of `engine.controlnet`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..guidance import expand_rows


@dataclass(frozen=True)
class ControlResiduals:
    """What a ControlNet adds to the UNet: one residual per down-block output and one for the mid block."""

    down: tuple[torch.Tensor, ...]
    mid: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.mid.shape[0])

    def scaled(self, scale: torch.Tensor) -> ControlResiduals:
        """The residuals with row i multiplied by `scale[i]`."""
        return ControlResiduals(tuple(_scale_rows(tensor, scale) for tensor in self.down),
                                _scale_rows(self.mid, scale))

    def unet_kwargs(self) -> dict:
        """`UNet2DConditionModel.forward`'s arguments for these residuals."""
        return {"down_block_additional_residuals": list(self.down), "mid_block_additional_residual": self.mid}

    def tensors(self) -> list[torch.Tensor]:
        """Down residuals, then the mid one: the order compiled graphs take them in."""
        return [*self.down, self.mid]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> ControlResiduals:
        """The inverse of `tensors`."""
        return cls(tuple(tensors[:-1]), tensors[-1])


def _scale_rows(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return tensor * scale.to(tensor.dtype).view(-1, *([1] * (tensor.dim() - 1)))


@dataclass(frozen=True)
class ControlRows:
    """The control images of one UNet call, one per UNet row (`images`: `[rows, 3, H, W]` in [0, 1]), and each
    row's ControlNet scale (`scale`: `[rows]`)."""

    images: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def for_call(cls, cfg_type: str, slot_images: torch.Tensor, frames_per_slot: int, scale: float) -> ControlRows:
        """The rows of a call in guidance mode `cfg_type` whose slots hold `slot_images` (ordered like the
        latents), every row at `scale`."""
        images = expand_rows(cfg_type, slot_images, frames_per_slot)
        return cls(images, torch.full((images.shape[0],), float(scale), device=images.device))

    @classmethod
    def cat(cls, rows: list[ControlRows]) -> ControlRows:
        """Several calls' rows in one batch, in order."""
        return cls(torch.cat([each.images for each in rows]), torch.cat([each.scale for each in rows]))

    @property
    def active(self) -> bool:
        """Whether any row has a nonzero scale (at 0 everywhere the ControlNet is not run at all)."""
        return bool((self.scale != 0).any())
