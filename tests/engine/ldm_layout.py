"""Test-only: write our diffusers components as one checkpoint in the original LDM/SD layout.

Real single-file checkpoints (`v1-5-pruned-emaonly.safetensors`, community fine-tunes) keep the
layout of the original CompVis code: `model.diffusion_model.*` (UNet), `first_stage_model.*`
(VAE) and `cond_stage_model.transformer.*` (CLIP text encoder). No such file can be downloaded
here, so the tests build one from the tiny model by inverting diffusers' own conversion
(`diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint`); the tests check
that converting back with diffusers gives every original tensor exactly.
"""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# diffusers name -> LDM name of the parts that are not inside a numbered block.
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(name: str, mapping: dict[str, str]) -> str:
    """Rename the leading module path of `name` (e.g. `norm1.weight`) through `mapping`."""
    for old, new in mapping.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's weights under `model.diffusion_model.*` names."""
    per_block = unet.config.layers_per_block + 1  # LDM numbers a downsampler/upsampler as one more layer
    up_has_attention = {i: hasattr(block, "attentions") for i, block in enumerate(unet.up_blocks)}
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in unet.state_dict().items():
        if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            index = 1 + block * per_block + layer
            ldm = f"input_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets" \
                else f"input_blocks.{index}.1.{rest}"
        elif match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
            ldm = f"input_blocks.{1 + int(match[1]) * per_block + per_block - 1}.0.op.{match[2]}"
        elif match := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", name):
            ldm = f"middle_block.{2 * int(match[1])}.{_rename_head(match[2], _UNET_RESNET)}"
        elif match := re.match(r"mid_block\.attentions\.0\.(.+)", name):
            ldm = f"middle_block.1.{match[1]}"
        elif match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            index = block * per_block + layer
            ldm = f"output_blocks.{index}.0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets" \
                else f"output_blocks.{index}.1.{rest}"
        elif match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
            block = int(match[1])
            position = 2 if up_has_attention[block] else 1
            ldm = f"output_blocks.{block * per_block + per_block - 1}.{position}.conv.{match[2]}"
        else:
            ldm = _rename_head(name, _UNET_FIXED)
            if ldm == name:
                raise ValueError(f"no LDM name for UNet weight {name!r}")
        converted[UNET_PREFIX + ldm] = tensor
    return converted


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The full VAE's weights under `first_stage_model.*` names."""
    num_up = len(vae.config.up_block_types)
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in vae.state_dict().items():
        if match := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            ldm = f"encoder.down.{match[1]}.block.{match[2]}.{_rename_head(match[3], _VAE_RESNET)}"
        elif match := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
            ldm = f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
        elif match := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
            block = num_up - 1 - int(match[1])  # LDM numbers decoder blocks from the lowest resolution up
            ldm = f"decoder.up.{block}.block.{match[2]}.{_rename_head(match[3], _VAE_RESNET)}"
        elif match := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
            ldm = f"decoder.up.{num_up - 1 - int(match[1])}.upsample.conv.{match[2]}"
        elif match := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", name):
            ldm = f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
        elif match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", name):
            ldm = f"{match[1]}.mid.attn_1.{_rename_head(match[2], _VAE_ATTENTION)}"
            if tensor.dim() == 2:  # LDM's attention projections are 1×1 convolutions
                tensor = tensor[:, :, None, None]
        elif match := re.match(r"(encoder|decoder)\.(.+)", name):
            ldm = f"{match[1]}.{_rename_head(match[2], _VAE_FIXED)}"
        else:
            ldm = name  # quant_conv, post_quant_conv keep their names
        converted[VAE_PREFIX + ldm] = tensor
    return converted


def clip_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The text encoder's weights under `cond_stage_model.transformer.text_model.*` names."""
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in text_encoder.state_dict().items():
        # transformers ≥ 5.6 flattened CLIPTextModel; checkpoints keep the `text_model.` level.
        inner = name if name.startswith("text_model.") else "text_model." + name
        converted[CLIP_PREFIX + inner] = tensor
    return converted


def bundle_to_ldm(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict of all three networks, contiguous and ready for `safetensors`."""
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **clip_to_ldm(text_encoder)}
    return {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}
