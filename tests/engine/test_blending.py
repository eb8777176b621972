"""Prompt and seed blending and their transitions: blended K/V against K/V of the blend, one prompt or seed of
weight 1 equal to the plain one, unit-variance noise, fades that end exactly at their target."""

from __future__ import annotations

import copy

import pytest
import torch

from engine import StreamConfig, StreamEngine
from engine.conditioning import TextEmbedding, blend_embeddings, blend_kv, encode_text, mix_prompt_states
from engine.config import MAX_BLEND_ITEMS, MAX_TRANSITION_FRAMES
from engine.noise import mix_noise, seeded_noise, weighted_seed_noise
from engine.prompt import cross_attention_layers, precompute_kv

SIZE = 32
PROMPTS = ("a red fox", "watercolor", "a city at night")
WEIGHTS = (0.5, 0.3, 0.2)


def make_config(**changes) -> StreamConfig:
    base = dict(width=SIZE, height=SIZE, similarity_filter=False, prompt="a red fox", negative_prompt="blurry")
    return StreamConfig().updated(**{**base, **changes})


def frames(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(count)]


def assert_same_conditioning(actual, expected, atol: float = 0.0) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        pairs = [(actual[key].encoder_hidden_states, expected[key].encoder_hidden_states)]
        if expected[key].kv_cache is not None:
            pairs += [(actual[key].kv_cache[name][part], value[part]) for name, value in expected[key].kv_cache.items()
                      for part in (0, 1)]
        if expected[key].added_cond is not None:
            pairs += [(actual[key].added_cond[name], value) for name, value in expected[key].added_cond.items()]
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=0, atol=atol)


# --------------------------------------------------------------------------- configuration


def test_weights_are_validated_and_normalised():
    config = StreamConfig(prompts=(("a", 2), ("b", 6)), seeds=((1, 1), (2, 3)))
    assert config.prompts == (("a", 0.25), ("b", 0.75)) and config.seeds == ((1, 0.25), (2, 0.75))
    assert StreamConfig(prompts=(("only", 0.3),)).weighted_prompts == (("only", 1.0),)
    assert StreamConfig(prompt="x", seed=5).weighted_prompts == (("x", 1.0),)
    assert StreamConfig(seed=5).weighted_seeds == ((5, 1.0),)
    bad = [
        (dict(prompts=(("a", -1.0),)), "`prompts` weights must be finite and >= 0"),
        (dict(prompts=(("a", float("nan")),)), "`prompts` weights must be finite"),
        (dict(prompts=(("a", 0.0), ("b", 0.0))), "`prompts` weights must not all be 0"),
        (dict(prompts=tuple((f"p{i}", 1.0) for i in range(MAX_BLEND_ITEMS + 1))), "`prompts` may hold at most 8"),
        (dict(prompts=((3, 1.0),)), "`prompts` entries must be \\[prompt, weight\\] pairs"),
        (dict(prompts=(("a",),)), "`prompts` must be a list of \\[prompt, weight\\] pairs"),
        (dict(seeds=((1, 1.0), (1, 2.0))), "`seeds` must name each seed once"),
        (dict(seeds=((True, 1.0),)), "`seeds` entries must be \\[seed, weight\\] pairs"),
        (dict(seeds=((1, float("inf")),)), "`seeds` weights must be finite"),
        (dict(prompt_blend="cubic"), "`prompt_blend` must be one of linear\\|slerp"),
        (dict(prompt_transition_frames=-1), "`prompt_transition_frames` must lie in \\[0, 600\\]"),
        (dict(seed_transition_frames=MAX_TRANSITION_FRAMES + 1), "`seed_transition_frames` must lie in"),
    ]
    for changes, message in bad:
        with pytest.raises(ValueError, match=message):
            StreamConfig(**changes)


def test_a_plain_prompt_or_seed_replaces_a_blend():
    config = StreamConfig(prompts=(("a", 1.0), ("b", 1.0)), seeds=((1, 1.0), (2, 1.0)))
    assert config.updated(prompt="c").prompts == () and config.updated(prompt="c").seeds == config.seeds
    assert config.updated(seed=4).seeds == () and config.updated(seed=4).prompts == config.prompts
    assert config.updated(prompt="c", prompts=(("d", 1.0),)).prompts == (("d", 1.0),)
    assert config.updated(guidance_scale=2.0).prompts == config.prompts


# --------------------------------------------------------------------------- prompt blends


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_blended_kv_equals_the_kv_of_the_blended_embeddings(tiny_models, tiny_sdxl_models, model, dtype, atol):
    """K = W_k·c is linear in c: Σ w_i·K_i = W_k·(Σ w_i·c_i). Not bit for bit (the sums round in another order):
    within a few float32 ulps (values up to ~2 differ by at most 5e-7 here), and to 1e-15 in float64."""
    models = tiny_models if model == "tiny" else tiny_sdxl_models
    unet = copy.deepcopy(models.unet).to(dtype)
    embeddings = [TextEmbedding(encode_text(models, text).hidden_states.to(dtype)) for text in PROMPTS]
    blended = blend_kv([precompute_kv(unet, each.hidden_states) for each in embeddings], WEIGHTS)
    direct = precompute_kv(unet, blend_embeddings(embeddings, WEIGHTS, "linear").hidden_states)
    assert blended.keys() == direct.keys() == cross_attention_layers(unet).keys()
    for name, (key, value) in direct.items():
        torch.testing.assert_close(blended[name][0], key, rtol=0, atol=atol)
        torch.testing.assert_close(blended[name][1], value, rtol=0, atol=atol)


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_a_blended_stream_caches_the_kv_of_its_blend(tiny_models, tiny_engine, cfg_type):
    config = make_config(cfg_type=cfg_type, prompts=tuple(zip(PROMPTS, WEIGHTS, strict=True)))
    stream = StreamEngine(tiny_engine, config)
    for layout in stream._prompt.layouts.values():
        projected = precompute_kv(tiny_models.unet, layout.encoder_hidden_states)
        for name, (key, value) in projected.items():
            torch.testing.assert_close(layout.kv_cache[name][0], key, rtol=0, atol=2e-6)
            torch.testing.assert_close(layout.kv_cache[name][1], value, rtol=0, atol=2e-6)
    plain = StreamEngine(tiny_engine, make_config(cfg_type=cfg_type))
    first = frames(1)[0]
    assert (stream(first) - plain(first)).abs().max() > 1e-3


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_sdxl_engine"])
def test_one_prompt_of_weight_one_is_the_plain_prompt_exactly(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    plain = StreamEngine(engine, make_config(cfg_type="full", prompt="a red fox"))
    listed = StreamEngine(engine, make_config(cfg_type="full", prompt="ignored", prompts=(("a red fox", 0.4),)))
    assert_same_conditioning(listed._prompt.layouts, plain._prompt.layouts)
    for frame in frames(3):
        assert torch.equal(listed(frame), plain(frame))


def test_new_weights_of_the_same_prompts_encode_and_project_nothing(tiny_models, tiny_engine):
    stream = StreamEngine(tiny_engine, make_config(prompts=(("a red fox", 0.5), ("watercolor", 0.5))))
    calls = {"text": 0, "to_k": 0}

    def count(kind):
        def hook(*_):
            calls[kind] += 1
        return hook

    hooks = [tiny_models.text_encoder.register_forward_hook(count("text"))]
    layers = cross_attention_layers(tiny_models.unet).values()
    hooks += [attn.to_k.register_forward_hook(count("to_k")) for attn in layers]
    try:
        for weight in (0.1, 0.4, 0.9):
            stream.update_params(prompts=(("a red fox", 1 - weight), ("watercolor", weight)))
        assert calls == {"text": 0, "to_k": 0}
        stream.update_params(prompts=(("a red fox", 0.5), ("something new", 0.5)))
        assert calls["text"] == 1 and calls["to_k"] == len(cross_attention_layers(tiny_models.unet))
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_sdxl_engine"])
def test_slerp_blends_on_the_sphere_and_projects_its_kv(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    models = engine.models
    a, b = encode_text(models, "a red fox"), encode_text(models, "watercolor")
    for weights, expected in (((1.0, 0.0), a), ((0.0, 1.0), b)):
        ends = blend_embeddings([a, b], weights, "slerp")
        torch.testing.assert_close(ends.hidden_states, expected.hidden_states, rtol=0, atol=1e-5)
    middle = blend_embeddings([a, b], (0.5, 0.5), "slerp")
    linear = blend_embeddings([a, b], (0.5, 0.5), "linear")
    # The chord's midpoint is shorter than the arc's: slerp keeps token norms where a linear blend shrinks them.
    norms = [each.hidden_states.norm(dim=-1) for each in (a, b, middle, linear)]
    assert (norms[2] >= torch.minimum(norms[0], norms[1]) - 1e-4).all()
    assert (norms[2] >= norms[3] - 1e-5).all() and (norms[2] - norms[3]).max() > 1e-4
    if a.pooled is not None:
        assert not torch.allclose(middle.pooled, linear.pooled)
    stream = StreamEngine(engine, make_config(prompts=(("a red fox", 0.5), ("watercolor", 0.5)),
                                              prompt_blend="slerp"))
    for layout in stream._prompt.layouts.values():
        projected = precompute_kv(models.unet, layout.encoder_hidden_states)
        name = next(iter(projected))
        assert torch.equal(layout.kv_cache[name][0], projected[name][0])


# --------------------------------------------------------------------------- prompt transitions


@pytest.mark.parametrize("engine_name", ["tiny_engine", "tiny_sdxl_engine"])
def test_a_prompt_transition_fades_linearly_and_ends_exactly_at_the_new_prompt(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    steps = 4
    stream = StreamEngine(engine, make_config(cfg_type="full", prompt_transition_frames=steps))
    target = StreamEngine(engine, make_config(cfg_type="full", prompt="an oil painting"))
    inputs = frames(steps + 2)
    stream(inputs[0])
    source, state = stream._prompt, stream._state
    stream.update_params(prompt="an oil painting")
    assert stream._prompt is source  # nothing changes before the next frame
    for k in range(1, steps + 1):
        stream(inputs[k])
        assert stream._state is state  # no re-prepare: the buffer keeps going
        if k < steps:
            expected = mix_prompt_states(source, target._prompt, k / steps)
            assert_same_conditioning(stream._prompt.layouts, expected.layouts)
            # The mixed K/V are the K/V of the mixed embeddings (linearity again).
            layout = next(iter(stream._prompt.layouts.values()))
            projected = precompute_kv(engine.models.unet, layout.encoder_hidden_states)
            name = next(iter(projected))
            torch.testing.assert_close(layout.kv_cache[name][0], projected[name][0], rtol=0, atol=2e-6)
    assert stream.transitions.prompt_fade is None
    assert_same_conditioning(stream._prompt.layouts, target._prompt.layouts)


def test_without_transition_frames_a_prompt_switches_at_once(tiny_engine):
    stream = StreamEngine(tiny_engine, make_config())
    stream(frames(1)[0])
    stream.update_params(prompt="an oil painting")
    assert stream.transitions.prompt_fade is None and stream._prompt.prompt == "an oil painting"


def test_a_re_prepare_during_a_transition_switches_at_once(tiny_engine):
    stream = StreamEngine(tiny_engine, make_config(prompt_transition_frames=5, seed_transition_frames=5))
    stream(frames(1)[0])
    stream.update_params(prompt="an oil painting", seed=9)
    stream(frames(1)[0])
    assert stream.transitions.prompt_fade is not None and stream.transitions.noise_fade is not None
    stream.update_params(t_index_list=(20, 40))
    assert stream.transitions.prompt_fade is None and stream.transitions.noise_fade is None
    reference = StreamEngine(tiny_engine, make_config(prompt="an oil painting", seed=9, t_index_list=(20, 40)))
    assert_same_conditioning(stream._prompt.layouts, reference._prompt.layouts)
    assert torch.equal(stream._state.fixed_noise, reference._state.fixed_noise)


# --------------------------------------------------------------------------- seeds


def test_one_seed_of_weight_one_is_the_plain_seed_exactly(tiny_engine):
    shape = (2, 4, 8, 8)
    assert torch.equal(weighted_seed_noise(((7, 1.0),), shape), seeded_noise(7, shape))
    plain = StreamEngine(tiny_engine, make_config(seed=7))
    listed = StreamEngine(tiny_engine, make_config(seed=3, seeds=((7, 0.25),)))
    assert torch.equal(listed._state.fixed_noise, plain._state.fixed_noise)
    for frame in frames(3):
        assert torch.equal(listed(frame), plain(frame))


@pytest.mark.parametrize("seeds", [((2, 0.5), (7, 0.5)), ((1, 0.7), (2, 0.2), (3, 0.1)), ((4, 0.9), (5, 0.1))])
def test_a_seed_blend_has_unit_variance_per_slot(seeds):
    # 4 slots of 4×128×128 latents (a 1024×1024 frame): the sample variance of 65536 standard normal values
    # has a standard deviation of √(2/65536) ≈ 0.0055, so 0.03 is more than 5 of them.
    noise = weighted_seed_noise(seeds, (4, 4, 128, 128))
    for slot in noise:
        assert abs(slot.var().item() - 1) < 0.03 and abs(slot.mean().item()) < 0.03
    # Without the renormalisation, Σ w_i·ε_i would have variance Σ w_i² < 1.
    unnormalised = sum(weight * seeded_noise(seed, (4, 4, 128, 128)) for seed, weight in seeds)
    assert unnormalised.var().item() < 0.85
    torch.testing.assert_close(noise, unnormalised / sum(w * w for _, w in seeds) ** 0.5, rtol=1e-6, atol=1e-6)


def test_a_seed_transition_ends_exactly_at_the_new_seeds_noise(tiny_engine):
    steps = 3
    stream = StreamEngine(tiny_engine, make_config(seed=2, seed_transition_frames=steps))
    target = StreamEngine(tiny_engine, make_config(seeds=((7, 0.5), (11, 0.5))))
    inputs = frames(steps + 1)
    stream(inputs[0])
    source, state = stream._state.fixed_noise, stream._state
    stream.update_params(seeds=((7, 0.5), (11, 0.5)))
    assert stream._state.fixed_noise is source
    for k in range(1, steps + 1):
        stream(inputs[k])
        assert stream._state is state
        if k < steps:
            mixed = mix_noise(source, target._state.fixed_noise, k / steps)
            assert torch.equal(stream._state.fixed_noise, mixed)
            assert abs(mixed.var().item() - 1) < 0.2  # ((1 − t)·ε_a + t·ε_b) / √((1 − t)² + t²) stays N(0, 1)
    assert stream.transitions.noise_fade is None
    assert torch.equal(stream._state.fixed_noise, target._state.fixed_noise)


def test_a_seed_change_without_transition_switches_at_once_as_before(tiny_engine):
    stream = StreamEngine(tiny_engine, make_config(seed=2))
    stream(frames(1)[0])
    stream.update_params(seed=9)
    fresh = StreamEngine(tiny_engine, make_config(seed=9))
    assert torch.equal(stream._state.fixed_noise, fresh._state.fixed_noise)
    assert torch.equal(stream._state.stock_noise, fresh._state.stock_noise)
