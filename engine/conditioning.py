"""What prompts give the UNet, for both model families: text embeddings, blends, K/V and SDXL's added inputs.

- **Families.** SD 1.x/2.x: the text encoder's last hidden state. SDXL: the penultimate hidden states of both
  text encoders side by side, plus SDXL's added conditioning: the second encoder's pooled (projected) embedding
  (`text_embeds`) and the time ids (original size, crop corner (0, 0), target size: the frame's size).
- **Blends.** A weighted prompt list (weights w_i summing to 1) is blended linearly, c = Σ w_i·c_i, or by slerp.
  Each cross-attention layer's K = W_k·c and V = W_v·c are linear in c, so the K/V of a linear blend is the same
  blend of each prompt's K/V: `PromptEncoder` caches each prompt's embedding and K/V once, and a new set of
  weights (a slider moving) costs a weighted sum, no text encoder and no projection. A slerp blend is not
  linear: its K/V are projected from the blended embedding.
- **Fades.** A transition between two prompt states mixes them linearly, embeddings, K/V and added inputs alike
  (`mix_prompt_states`); by the same linearity, the mixed K/V are those of the mixed embeddings.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import CLIPTokenizer

from . import guidance
from .config import MAX_BLEND_ITEMS, StreamConfig
from .models import ModelBundle
from .prompt import Conditioning, KVCache, PromptState, cross_attention_layers, encode_prompt, precompute_kv

LayoutKey = tuple[str, int]
#: Dot products of unit vectors this close to ±1 are blended linearly (slerp's sin θ would divide by ~0).
_SLERP_PARALLEL = 1 - 1e-6


@dataclass(frozen=True)
class TextEmbedding:
    """One prompt, encoded.

    Args:
        hidden_states (`torch.Tensor`): what cross-attention attends to, `[1, tokens, dim]`.
        pooled (`torch.Tensor | None`): SDXL's pooled text embedding `[1, dim_2]` (added conditioning); None for SD.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None


def _token_ids(tokenizer: CLIPTokenizer, prompt: str, device: torch.device) -> torch.Tensor:
    tokens = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    return tokens.input_ids.to(device)


@torch.no_grad()
def encode_text(models: ModelBundle, prompt: str) -> TextEmbedding:
    """`prompt` as the UNet's family reads it (see the module docstring), as diffusers' pipelines encode it."""
    if models.family == "sd":
        return TextEmbedding(encode_prompt(models.tokenizer, models.text_encoder, prompt))
    first = models.text_encoder(_token_ids(models.tokenizer, prompt, models.text_encoder.device),
                                output_hidden_states=True)
    second = models.text_encoder_2(_token_ids(models.tokenizer_2, prompt, models.text_encoder_2.device),
                                   output_hidden_states=True)
    hidden_states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return TextEmbedding(hidden_states, second.text_embeds)


def sdxl_time_ids(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """SDXL's time ids of a `height`×`width` frame, `[1, 6]`: original size, crop corner (0, 0), target size (as
    diffusers' SDXL pipelines build them for an image of that size), in `like`'s dtype and device."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=like.dtype, device=like.device)


def expand_prompt_rows(cfg_type: str, cond: torch.Tensor, uncond: torch.Tensor, rows: int,
                       frames_per_slot: int) -> torch.Tensor:
    """`guidance.expand_prompt_embeds` for a per-prompt tensor of any shape `[1, ...]` (pooled embeddings, K/V):
    its rows of the UNet batch, negative-prompt rows first."""
    flat = guidance.expand_prompt_embeds(cfg_type, cond.reshape(1, 1, -1), uncond.reshape(1, 1, -1), rows,
                                         frames_per_slot)
    return flat.reshape(-1, *cond.shape[1:])


def _expand_kv(cfg_type: str, cond: KVCache, uncond: KVCache, rows: int, frames_per_slot: int) -> KVCache:
    return {name: tuple(expand_prompt_rows(cfg_type, c, u, rows, frames_per_slot)
                        for c, u in zip(cond[name], uncond[name], strict=True))
            for name in cond}


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of each vector along the last axis, from `a` (t = 0) to `b` (t = 1)."""
    a_unit = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b_unit = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = (a_unit * b_unit).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    parallel = cosine.abs() > _SLERP_PARALLEL
    safe_sine = torch.where(parallel, torch.ones_like(sine), sine)
    spherical = (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / safe_sine
    return torch.where(parallel, torch.lerp(a, b, t), spherical)


def _blend(tensors: Sequence[torch.Tensor], weights: Sequence[float], mode: str) -> torch.Tensor:
    if mode == "linear":
        total = tensors[0] * weights[0]
        for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
            total = total + tensor * weight
        return total
    # Slerp of several: each new prompt joins the running blend with its share of the weight so far (exact for
    # two prompts; for more, the incremental spherical mean, which depends on the order given).
    blended, seen = tensors[0], weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        seen += weight
        blended = _slerp(blended, tensor, weight / seen if seen > 0 else 0.0)
    return blended


def blend_embeddings(embeddings: Sequence[TextEmbedding], weights: Sequence[float], mode: str) -> TextEmbedding:
    """The weighted blend (`linear` or `slerp`) of `embeddings`, hidden states and pooled alike; weights sum to 1."""
    if len(embeddings) == 1:
        return embeddings[0]
    pooled = None
    if embeddings[0].pooled is not None:
        pooled = _blend([each.pooled for each in embeddings], weights, mode)
    return TextEmbedding(_blend([each.hidden_states for each in embeddings], weights, mode), pooled)


def blend_kv(caches: Sequence[KVCache], weights: Sequence[float]) -> KVCache:
    """Σ w_i·K_i and Σ w_i·V_i of every layer: the K/V of the linear blend Σ w_i·c_i of the prompts they were
    projected from (K = W_k·c is linear in c)."""
    return {name: (_blend([cache[name][0] for cache in caches], weights, "linear"),
                   _blend([cache[name][1] for cache in caches], weights, "linear"))
            for name in caches[0]}


def kv_is_linear(unet: torch.nn.Module) -> bool:
    """Whether every cross-attention K/V is a linear (affine) map of the text: no norm on the text or the keys."""
    return all(attn.norm_cross is None and attn.norm_k is None for attn in cross_attention_layers(unet).values())


def mix_conditioning(source: Conditioning, target: Conditioning, t: float) -> Conditioning:
    """(1 − t)·source + t·target of every tensor (`torch.lerp`: exactly `target` at t = 1)."""
    kv = None
    if target.kv_cache is not None:
        kv = {name: (torch.lerp(source.kv_cache[name][0], key, t), torch.lerp(source.kv_cache[name][1], value, t))
              for name, (key, value) in target.kv_cache.items()}
    added = None
    if target.added_cond is not None:
        added = {name: torch.lerp(source.added_cond[name], value, t) for name, value in target.added_cond.items()}
    return Conditioning(torch.lerp(source.encoder_hidden_states, target.encoder_hidden_states, t), kv, added)


def mix_prompt_states(source: PromptState, target: PromptState, t: float) -> PromptState:
    """The prompt state a fraction `t` of the way from `source` to `target` (same layouts), named as `target`."""
    layouts = {key: mix_conditioning(source.layouts[key], conditioning, t)
               for key, conditioning in target.layouts.items()}
    return PromptState(target.prompt, target.negative_prompt, layouts)


def describe_prompts(weighted: Sequence[tuple[str, float]]) -> str:
    """The prompt of a stream for people: the prompt itself, or each prompt with its weight."""
    if len(weighted) == 1:
        return weighted[0][0]
    return " + ".join(f"{text} ({weight:.3g})" for text, weight in weighted)


@dataclass
class _Encoded:
    embedding: TextEmbedding
    kv: KVCache | None = None


class PromptEncoder:
    """One stream's prompt encodings: builds its `PromptState`s and keeps each recent prompt's embedding (and, for
    blends, its one-row K/V), so a blend whose weights change encodes and projects nothing again.

    Args:
        models (`ModelBundle`): the shared models (text encoders and UNet are only read).
        kv_cache (`bool`): whether the layouts carry precomputed cross-attention K/V.
        capacity (`int`, defaults to `MAX_BLEND_ITEMS + 1`): prompts kept: a blend of the most prompts and its
            negative prompt.
    """

    def __init__(self, models: ModelBundle, kv_cache: bool, capacity: int = MAX_BLEND_ITEMS + 1):
        self.models = models
        self.kv_cache = kv_cache
        self.capacity = capacity
        self._linear_kv = kv_is_linear(models.unet)
        self._encoded: OrderedDict[str, _Encoded] = OrderedDict()
        # Updates encode on their callers' threads; two at once must not interleave on the cache.
        self._lock = threading.Lock()

    def _get(self, text: str) -> _Encoded:
        encoded = self._encoded.get(text)
        if encoded is None:
            encoded = _Encoded(encode_text(self.models, text))
            self._encoded[text] = encoded
            while len(self._encoded) > self.capacity:
                self._encoded.popitem(last=False)
        self._encoded.move_to_end(text)
        return encoded

    def _kv_row(self, text: str) -> KVCache:
        encoded = self._get(text)
        if encoded.kv is None:
            encoded.kv = precompute_kv(self.models.unet, encoded.embedding.hidden_states)
        return encoded.kv

    def state(self, config: StreamConfig, layouts: Sequence[LayoutKey]) -> PromptState:
        """The conditioning of `config`'s prompts (blended by `config.prompt_blend`) and negative prompt for each
        UNet batch layout in `layouts`."""
        with self._lock:
            return self._state(config, layouts)

    @torch.no_grad()
    def _state(self, config: StreamConfig, layouts: Sequence[LayoutKey]) -> PromptState:
        weighted = config.weighted_prompts
        texts, weights = [text for text, _ in weighted], [weight for _, weight in weighted]
        needs_negative = guidance.needs_negative_prompt(config.cfg_type)
        # The negative prompt comes first: a blend of `capacity - 1` prompts then never evicts one of its own.
        uncond = self._get(config.negative_prompt).embedding if needs_negative else None
        cond = blend_embeddings([self._get(text).embedding for text in texts], weights, config.prompt_blend)
        uncond = cond if uncond is None else uncond
        blended = len(texts) > 1
        cond_kv = uncond_kv = None
        if self.kv_cache and blended:
            if config.prompt_blend == "linear" and self._linear_kv:
                cond_kv = blend_kv([self._kv_row(text) for text in texts], weights)
            else:
                cond_kv = precompute_kv(self.models.unet, cond.hidden_states)
            uncond_kv = self._kv_row(config.negative_prompt) if needs_negative else cond_kv
        states = {}
        for cfg_type, rows in layouts:
            f = config.frame_buffer_size
            hidden_states = guidance.expand_prompt_embeds(cfg_type, cond.hidden_states, uncond.hidden_states, rows, f)
            if not self.kv_cache:
                kv = None
            elif blended:
                kv = _expand_kv(cfg_type, cond_kv, uncond_kv, rows, f)
            else:
                # One prompt: K/V projected from exactly the embeddings the uncached UNet would project.
                kv = precompute_kv(self.models.unet, hidden_states)
            added = None
            if cond.pooled is not None:
                added = {"text_embeds": expand_prompt_rows(cfg_type, cond.pooled, uncond.pooled, rows, f),
                         "time_ids": sdxl_time_ids(config.height, config.width, cond.pooled)
                         .expand(hidden_states.shape[0], -1).contiguous()}
            states[(cfg_type, rows)] = Conditioning(hidden_states, kv, added)
        return PromptState(describe_prompts(weighted), config.negative_prompt, states)
