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
    """The embedded control images of one UNet call, one per UNet row (`embeddings`: `[rows, C, h, w]`, the
    ControlNet's condition embedding of each row's control image, `engine.controlnet.embed_control`), and each
    row's ControlNet scale (`scale`: `[rows]`)."""

    embeddings: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def for_call(cls, cfg_type: str, slot_embeddings: torch.Tensor, frames_per_slot: int,
                 scale: float) -> ControlRows:
        """The rows of a call in guidance mode `cfg_type` whose slots hold `slot_embeddings` (ordered like the
        latents), every row at `scale`."""
        embeddings = expand_rows(cfg_type, slot_embeddings, frames_per_slot)
        return cls(embeddings, torch.full((embeddings.shape[0],), float(scale), device=embeddings.device))

    @classmethod
    def cat(cls, rows: list[ControlRows]) -> ControlRows:
        """Several calls' rows in one batch, in order."""
        return cls(torch.cat([each.embeddings for each in rows]), torch.cat([each.scale for each in rows]))

    @property
    def active(self) -> bool:
        """Whether any row has a nonzero scale (at 0 everywhere the ControlNet is not run at all)."""
        return bool((self.scale != 0).any())


@dataclass(frozen=True)
class ControlFrames:
    """Control images of consecutive stream-batch slots (`images`: `[k, 3, H, W]` in [0, 1]) and their ControlNet
    condition embeddings (`embeddings`: `[k, C, h, w]`), made once per frame and carried through the buffer."""

    images: torch.Tensor
    embeddings: torch.Tensor

    def __getitem__(self, rows: slice) -> ControlFrames:
        return ControlFrames(self.images[rows], self.embeddings[rows])

    def repeat(self, times: int) -> ControlFrames:
        """These frames `times` times over, in order."""
        return ControlFrames(self.images.repeat(times, 1, 1, 1), self.embeddings.repeat(times, 1, 1, 1))

    @classmethod
    def cat(cls, parts: list[ControlFrames]) -> ControlFrames:
        """The frames of `parts`, in order."""
        return cls(torch.cat([part.images for part in parts]), torch.cat([part.embeddings for part in parts]))
