"""diffusers' `UNet2DConditionModel.forward`, split into a shallow head, a deep part and a shallow tail.

Head: time embedding, `conv_in` and the first down block. Deep: the other down blocks, the mid block and
every up block but the last. Tail: the last up block and the output convolution. The deep part can run
on a subset of rows (DeepCache's cut: the tail needs the head's skip connections and the deep output).
Supported: the text-conditioned UNet, with SDXL's added text/time conditioning (`addition_embed_type="text_time"`,
folded into the time embedding by the head); no class or ControlNet inputs. `split_unet_forward` with every row
deep equals `unet(...)` exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from ..prompt import Conditioning


@dataclass(frozen=True)
class HeadOutput:
    """What the head leaves for the deep part and the tail."""

    emb: torch.Tensor
    hidden: torch.Tensor
    skips: tuple[torch.Tensor, ...]
    forward_upsample_size: bool

    def rows(self, index: torch.Tensor) -> HeadOutput:
        """The head output of the rows `index`."""
        return HeadOutput(self.emb[index], self.hidden[index], tuple(skip[index] for skip in self.skips),
                          self.forward_upsample_size)


def check_supported(unet: UNet2DConditionModel) -> None:
    """Raise `ValueError` for UNet features the split forward leaves out."""
    config = unet.config
    unsupported = [name for name in ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type")
                   if getattr(config, name, None) is not None]
    if getattr(config, "addition_embed_type", None) == "text_time":
        unsupported.remove("addition_embed_type")
    if config.center_input_sample or unsupported or len(unet.down_blocks) < 2:
        raise ValueError(f"skip policies need a plain text-conditioned UNet with >= 2 down blocks; "
                         f"unsupported: {unsupported or 'center_input_sample or too few blocks'}")


def _block_kwargs(block: torch.nn.Module, conditioning: Conditioning) -> dict:
    if not getattr(block, "has_cross_attention", False):
        return {}
    kwargs = {"encoder_hidden_states": conditioning.encoder_hidden_states}
    attention = conditioning.attention_kwargs()
    if attention:
        kwargs["cross_attention_kwargs"] = attention
    return kwargs


def run_head(unet: UNet2DConditionModel, sample: torch.Tensor, timesteps: torch.Tensor,
             conditioning: Conditioning) -> HeadOutput:
    """Time embedding, `conv_in` and the first down block, on every row."""
    factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(dim % factor for dim in sample.shape[-2:])
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
    # SDXL's pooled text and time ids join the time embedding, as in `UNet2DConditionModel.forward`.
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=conditioning.encoder_hidden_states,
                                 added_cond_kwargs=conditioning.added_cond or {})
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    sample = unet.conv_in(sample)
    first = unet.down_blocks[0]
    hidden, res_samples = first(hidden_states=sample, temb=emb, **_block_kwargs(first, conditioning))
    return HeadOutput(emb, hidden, (sample, *res_samples), forward_upsample_size)


def _tail_skip_count(unet: UNet2DConditionModel) -> int:
    return len(unet.up_blocks[-1].resnets)


def _up_block(unet: UNet2DConditionModel, block: torch.nn.Module, sample: torch.Tensor, emb: torch.Tensor,
              skips: tuple[torch.Tensor, ...], upsample_size, conditioning: Conditioning) -> torch.Tensor:
    return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size,
                 **_block_kwargs(block, conditioning))


def run_down(unet: UNet2DConditionModel, head: HeadOutput, conditioning: Conditioning) -> HeadOutput:
    """Down blocks 1…: `head` with `hidden` the deepest down output and every down block's skips added."""
    sample, skips = head.hidden, head.skips
    for block in unet.down_blocks[1:]:
        sample, res_samples = block(hidden_states=sample, temb=head.emb, **_block_kwargs(block, conditioning))
        skips += res_samples
    return HeadOutput(head.emb, sample, skips, head.forward_upsample_size)


def run_mid_up(unet: UNet2DConditionModel, down: HeadOutput, conditioning: Conditioning) -> torch.Tensor:
    """The mid block and up blocks …−2 on `run_down`'s output: the input of the last up block."""
    sample, skips = down.hidden, down.skips
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            kwargs = _block_kwargs(unet.mid_block, conditioning)
            sample = unet.mid_block(sample, down.emb, **kwargs)
        else:
            sample = unet.mid_block(sample, down.emb)
    for block in unet.up_blocks[:-1]:
        count = len(block.resnets)
        res_samples, skips = skips[-count:], skips[:-count]
        upsample_size = skips[-1].shape[2:] if down.forward_upsample_size else None
        sample = _up_block(unet, block, sample, down.emb, res_samples, upsample_size, conditioning)
    return sample


def run_deep(unet: UNet2DConditionModel, head: HeadOutput, conditioning: Conditioning) -> torch.Tensor:
    """Down blocks 1…, the mid block and up blocks …−2: the input of the last up block.

    `head` and `conditioning` may hold any subset of the batch's rows, as long as they hold the same.
    """
    return run_mid_up(unet, run_down(unet, head, conditioning), conditioning)


def run_tail(unet: UNet2DConditionModel, head: HeadOutput, deep: torch.Tensor,
             conditioning: Conditioning) -> torch.Tensor:
    """The last up block (fed by the head's skip connections, the first ones of `head.skips`) and the output
    convolution; `head` may also be `run_down`'s output, whose skips start with the head's."""
    skips = head.skips[:_tail_skip_count(unet)]
    sample = _up_block(unet, unet.up_blocks[-1], deep, head.emb, skips, None, conditioning)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


def split_unet_forward(unet: UNet2DConditionModel, sample: torch.Tensor, timesteps: torch.Tensor,
                       conditioning: Conditioning) -> torch.Tensor:
    """Head, deep part and tail on every row: the UNet's own output."""
    head = run_head(unet, sample, timesteps, conditioning)
    return run_tail(unet, head, run_deep(unet, head, conditioning), conditioning)
