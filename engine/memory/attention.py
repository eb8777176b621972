"""Attention in slices: batch rows one slice at a time, query rows in chunks, K/V cache kept.

diffusers' own `set_attention_slice` installs its `SlicedAttnProcessor`, which would drop our
per-prompt cross-attention K/V cache; this processor is a `CachedKVAttnProcessor` (so the engine
keeps it and the cache keeps working) that computes the same attention slice by slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..prompt import CachedKVAttnProcessor, KVCache, _project_key_value, _to_heads
from .slicing import row_slices


class SlicedKVAttnProcessor(CachedKVAttnProcessor):
    """`CachedKVAttnProcessor` computed `batch_rows` samples and `query_rows` query tokens at a time.

    Each query row's attention reads every key of its own sample, so cutting the queries (and the
    batch) changes which kernels run, not what they compute: exact up to floating-point order. Only one
    chunk's queries, scores and projected output exist at once; K/V are projected once per batch slice.
    Calls the fast path does not cover (masks, spatial or group norms, 4-D inputs) run unsliced.

    Args:
        name (`str`): the layer's name, the key of its entry in the K/V cache.
        batch_rows (`int`): samples per slice.
        query_rows (`int`): query tokens per chunk.
    """

    def __init__(self, name: str, batch_rows: int, query_rows: int):
        super().__init__(name)
        self.batch_rows = batch_rows
        self.query_rows = query_rows

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        plain = (attention_mask is None and attn.spatial_norm is None and attn.group_norm is None
                 and hidden_states.ndim == 3)
        if not plain:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, kv_cache)
        cached = kv_cache.get(self.name) if kv_cache is not None and attn.is_cross_attention else None
        rows, tokens = hidden_states.shape[:2]
        out = None
        for start, stop in row_slices(rows, self.batch_rows):
            states = hidden_states[start:stop]
            if cached is not None:
                key, value = (tensor[start:stop] if tensor.shape[0] == rows else tensor for tensor in cached)
            elif encoder_hidden_states is None:
                key, value = _project_key_value(attn, states, is_cross=False)
            else:
                key, value = _project_key_value(attn, encoder_hidden_states[start:stop])
            for first, last in row_slices(tokens, self.query_rows):
                piece = self._attend(attn, states[:, first:last], key, value)
                if out is None:
                    out = piece.new_empty((rows, tokens, piece.shape[-1]))
                out[start:stop, first:last] = piece
        return out

    @staticmethod
    def _attend(attn: Attention, queries: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        query = _to_heads(attn, attn.to_q(queries))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        hidden = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden = hidden.transpose(1, 2).reshape(queries.shape[0], -1, attn.heads * query.shape[-1]).to(query.dtype)
        hidden = attn.to_out[1](attn.to_out[0](hidden))
        if attn.residual_connection:
            hidden = hidden + queries
        return hidden / attn.rescale_output_factor
