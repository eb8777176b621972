"""Test-only: write our diffusers components as one checkpoint in the original LDM/SD layout.

Real single-file checkpoints (`v1-5-pruned-emaonly.safetensors`, community fine-tunes) keep the
layout of the original CompVis code: `model.diffusion_model.*` (UNet), `first_stage_model.*`
(VAE) and `cond_stage_model.transformer.*` (CLIP text encoder). SDXL files (Stability's SGM code) keep
the same UNet and VAE names and put the text encoders under `conditioner.embedders.0.transformer.*`
(CLIP, in the transformers layout) and `conditioner.embedders.1.model.*` (OpenCLIP: one fused q/k/v
projection per layer, `resblocks`, `ln_final`, a transposed `text_projection`). No such file can be
downloaded here, so the tests build one from the tiny models by inverting diffusers' own conversion
(`diffusers.loaders.single_file_utils.convert_ldm_{unet,vae,clip}_checkpoint`, `convert_open_clip_checkpoint`);
the tests check that converting back with diffusers gives every original tensor exactly.
"""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers name -> LDM name of the parts that are not inside a numbered block.
_UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's added text/time embedding.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_OPEN_CLIP_FIXED = {
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}
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


def clip_to_ldm(text_encoder: CLIPTextModel, prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """The text encoder's weights under `<prefix>text_model.*` names (`cond_stage_model.transformer.` by default)."""
    converted: dict[str, torch.Tensor] = {}
    for name, tensor in text_encoder.state_dict().items():
        # transformers ≥ 5.6 flattened CLIPTextModel; checkpoints keep the `text_model.` level.
        inner = name if name.startswith("text_model.") else "text_model." + name
        converted[prefix + inner] = tensor
    return converted


def open_clip_to_ldm(text_encoder: CLIPTextModelWithProjection,
                     prefix: str = SDXL_OPEN_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder under OpenCLIP names: q, k and v fused into `in_proj_*` per layer."""
    state = text_encoder.state_dict()
    converted: dict[str, torch.Tensor] = {}
    layers = {int(match[1]) for name in state if (match := re.match(r"text_model\.encoder\.layers\.(\d+)\.", name))}
    for name, tensor in state.items():
        if name in _OPEN_CLIP_FIXED:
            converted[prefix + _OPEN_CLIP_FIXED[name]] = tensor
        elif name == "text_projection.weight":
            converted[prefix + "text_projection"] = tensor.T
        elif match := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)", name):
            if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
                continue  # fused below
            converted[f"{prefix}transformer.resblocks.{match[1]}.{_rename_head(match[2], _OPEN_CLIP_LAYER)}"] = tensor
        elif not name.endswith("position_ids"):
            raise ValueError(f"no OpenCLIP name for text encoder weight {name!r}")
    for layer in sorted(layers):
        attention = f"text_model.encoder.layers.{layer}.self_attn"
        for part in ("weight", "bias"):
            fused = torch.cat([state[f"{attention}.{projection}_proj.{part}"] for projection in "qkv"])
            converted[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{part}"] = fused
    return converted


def bundle_to_ldm(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict of all three networks, contiguous and ready for `safetensors`."""
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **clip_to_ldm(text_encoder)}
    return {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}


def sdxl_bundle_to_ldm(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                       text_encoder_2: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    """One SDXL (SGM-layout) state dict of the four networks, contiguous and ready for `safetensors`."""
    state = {**unet_to_ldm(unet), **vae_to_ldm(vae), **clip_to_ldm(text_encoder, SDXL_CLIP_PREFIX),
             **open_clip_to_ldm(text_encoder_2)}
    return {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}
