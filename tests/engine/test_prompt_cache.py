"""The cross-attention K/V cache is exact and follows prompt updates."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.prompt import CachedKVAttnProcessor, cross_attention_layers, encode_prompt, precompute_kv


def test_cached_kv_equals_projection_and_stock_processor(tiny_models):
    unet = tiny_models.unet
    states = encode_prompt(tiny_models.tokenizer, tiny_models.text_encoder, "a cat").expand(3, -1, -1).contiguous()
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([900, 500, 100])
    # Installs the processors (`kv_cache` is on by default).
    Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager"))
    assert all(isinstance(p, CachedKVAttnProcessor) for p in unet.attn_processors.values())
    with torch.no_grad():
        uncached = unet(latents, timesteps, encoder_hidden_states=states).sample
        cached = unet(latents, timesteps, encoder_hidden_states=states,
                      cross_attention_kwargs={"kv_cache": precompute_kv(unet, states)}).sample
        assert torch.equal(cached, uncached)
        original = unet.attn_processors
        unet.set_attn_processor(AttnProcessor2_0())
        try:
            stock = unet(latents, timesteps, encoder_hidden_states=states).sample
        finally:
            unet.set_attn_processor(original)
    torch.testing.assert_close(cached, stock, rtol=0, atol=1e-6)


def test_cached_processor_really_skips_the_projection(tiny_models):
    unet = tiny_models.unet
    Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager"))
    states = encode_prompt(tiny_models.tokenizer, tiny_models.text_encoder, "a dog")
    kv = precompute_kv(unet, states)
    calls = []
    hooks = [attn.to_k.register_forward_hook(lambda *args: calls.append(1))
             for attn in cross_attention_layers(unet).values()]
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=states,
                 cross_attention_kwargs={"kv_cache": kv})
        assert calls == []
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=states)
        assert len(calls) == len(kv) > 0
    finally:
        for hook in hooks:
            hook.remove()


def test_engine_kv_cache_on_equals_off_and_follows_updates(tiny_models, tiny_engine):
    config = StreamConfig(width=64, height=64, t_index_list=(32, 45), cfg_type="full", similarity_filter=False)
    uncached_engine = Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager", kv_cache=False))
    cached, uncached = StreamEngine(tiny_engine, config), StreamEngine(uncached_engine, config)
    assert cached.kv_cache and not uncached.kv_cache
    assert all(layout.kv_cache is None for layout in uncached._prompt.layouts.values())
    frames = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for index, frame in enumerate(frames):
        if index == 2:
            for stream in (cached, uncached):
                stream.update_prompt("a new prompt", negative_prompt="new negative")
        assert torch.equal(cached(frame), uncached(frame))


def test_kv_cache_recomputed_only_when_the_prompt_changes(tiny_engine):
    config = StreamConfig(width=64, height=64, t_index_list=(45,), similarity_filter=False)
    stream = StreamEngine(tiny_engine, config)
    layout = next(iter(stream._prompt.layouts))
    before = stream._prompt.layouts[layout].kv_cache
    stream.update_params(guidance_scale=2.0)
    assert stream._prompt.layouts[layout].kv_cache is before
    stream.update_prompt("something else")
    after = stream._prompt.layouts[layout].kv_cache
    assert after is not before
    name = next(iter(after))
    assert not torch.equal(after[name][0], before[name][0])
