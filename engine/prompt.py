"""Prompt encoding and the cross-attention key/value cache.

A prompt is encoded once; each cross-attention layer's K = W_k·c and V = W_v·c are then computed
once per prompt and served to the UNet by `CachedKVAttnProcessor`, so a frame never re-projects the
text. The processor is a diffusers attention processor; the cache travels in `cross_attention_kwargs`,
so many streams can share one UNet, each with its own cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import CLIPTextModel, CLIPTokenizer

if TYPE_CHECKING:
    from .control.residuals import ControlResiduals
    from .temporal import AttentionBank

KVCache = dict[str, tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def encode_prompt(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str) -> torch.Tensor:
    """The text encoder's last hidden state for `prompt`, shaped `[1, max_length, dim]`."""
    tokens = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    input_ids = tokens.input_ids.to(text_encoder.device)
    return text_encoder(input_ids)[0]


def _to_heads(attn: Attention, tensor: torch.Tensor) -> torch.Tensor:
    batch = tensor.shape[0]
    return tensor.view(batch, -1, attn.heads, tensor.shape[-1] // attn.heads).transpose(1, 2)


def _project_key_value(
    attn: Attention, encoder_hidden_states: torch.Tensor, is_cross: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    if is_cross and attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = _to_heads(attn, attn.to_k(encoder_hidden_states))
    value = _to_heads(attn, attn.to_v(encoder_hidden_states))
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return key, value


class CachedKVAttnProcessor:
    """Scaled-dot-product attention (as diffusers' `AttnProcessor2_0`) that takes cross-attention K/V
    from `kv_cache[name]` when given one, and projects them itself otherwise.

    With a `temporal_bank` (`engine.temporal.AttentionBank`), self-attention also attends to the banked
    frames' keys and values and injects their closely matching features (the stream's `bank` mechanism); a
    compiled graph's bank (`engine.temporal.PaddedBank`) also masks its empty slots (`attention_mask`).
    """

    def __init__(self, name: str):
        self.name = name

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        temporal_bank: AttentionBank | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        cached = kv_cache.get(self.name) if kv_cache is not None and attn.is_cross_attention else None
        if cached is not None:
            batch_size, sequence_length = cached[0].shape[0], cached[0].shape[2]
        else:
            source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            batch_size, sequence_length = source.shape[0], source.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = _to_heads(attn, attn.to_q(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if cached is not None:
            key, value = cached
        elif encoder_hidden_states is None:
            key, value = _project_key_value(attn, hidden_states, is_cross=False)
            if temporal_bank is not None:
                key, value = temporal_bank.extend(self.name, key, value)
                attention_mask = temporal_bank.attention_mask(self.name, attention_mask)
        else:
            key, value = _project_key_value(attn, encoder_hidden_states)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * query.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if temporal_bank is not None and encoder_hidden_states is None and not attn.is_cross_attention:
            hidden_states = temporal_bank.inject(self.name, hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """The UNet's cross-attention modules by name."""
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, Attention) and module.is_cross_attention}


def install_kv_processors(unet: UNet2DConditionModel) -> None:
    """Give every attention layer of `unet` a `CachedKVAttnProcessor` (idempotent)."""
    if all(isinstance(p, CachedKVAttnProcessor) for p in unet.attn_processors.values()):
        return
    processors = {name: CachedKVAttnProcessor(name.removesuffix(".processor"))
                  for name in unet.attn_processors}
    unet.set_attn_processor(processors)


@torch.no_grad()
def precompute_kv(unet: UNet2DConditionModel, encoder_hidden_states: torch.Tensor) -> KVCache:
    """Each cross-attention layer's K and V for `encoder_hidden_states` (the UNet's whole batch)."""
    return {name: _project_key_value(attn, encoder_hidden_states)
            for name, attn in cross_attention_layers(unet).items()}


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning of one UNet batch layout: its embeddings and, when cached, each
    cross-attention layer's K/V computed from exactly those embeddings; for SDXL also the added conditioning
    (`text_embeds`, `time_ids`: one row per UNet row); `temporal_bank` is the stream's self-attention bank when
    its `temporal` mechanism is `bank` (set per call, never shared); `control` the ControlNet residuals of these
    rows (set per call)."""

    encoder_hidden_states: torch.Tensor
    kv_cache: KVCache | None
    added_cond: dict[str, torch.Tensor] | None = None
    temporal_bank: AttentionBank | None = None
    control: ControlResiduals | None = None

    def attention_kwargs(self) -> dict:
        """The `cross_attention_kwargs` that carry this conditioning's K/V cache and bank to the processors."""
        kwargs: dict = {}
        if self.kv_cache is not None:
            kwargs["kv_cache"] = self.kv_cache
        if self.temporal_bank is not None:
            kwargs["temporal_bank"] = self.temporal_bank
        return kwargs

    def unet_kwargs(self) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` (besides sample and timestep) for these rows."""
        kwargs: dict = {"encoder_hidden_states": self.encoder_hidden_states}
        attention = self.attention_kwargs()
        if attention:
            kwargs["cross_attention_kwargs"] = attention
        if self.added_cond is not None:
            kwargs["added_cond_kwargs"] = self.added_cond
        if self.control is not None:
            kwargs.update(self.control.unet_kwargs())
        return kwargs


@dataclass(frozen=True)
class PromptState:
    """What one prompt contributes to the UNet calls, per batch layout; swapped whole, never edited."""

    prompt: str
    negative_prompt: str
    layouts: dict[tuple[str, int], Conditioning]
