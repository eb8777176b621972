"""The SDXL family on `tiny-sdxl`: diffusers' own conditioning, exact K/V cache, stream batch, guidance, filter,
skip policies, cross-session batching, saving and loading."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, StableDiffusionXLPipeline
from ldm_layout import sdxl_bundle_to_ldm
from safetensors.torch import save_file
from test_batching import CountingRunner
from test_models import add_to_hub_cache
from test_stream import RecordingRunner

from engine import Engine, LoadConfig, StreamConfig, StreamEngine, load_models
from engine.batching import batch_key, step_batch
from engine.conditioning import encode_text, sdxl_time_ids
from engine.config import CFG_TYPES
from engine.models import DEFAULT_TAESDXL, ModelLoadError, build_builtin
from engine.prompt import Conditioning, install_kv_processors, precompute_kv
from engine.skip.unet_split import split_unet_forward

SIZE = 32


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No test here may reach the network: offline mode and an empty hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def make_config(**changes) -> StreamConfig:
    base = dict(width=SIZE, height=SIZE, similarity_filter=False, guidance_scale=1.5, delta=0.8,
                prompt="a red fox", negative_prompt="blurry")
    return StreamConfig().updated(**{**base, **changes})


def frames(count: int, seed: int = 0, size: int = SIZE) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def pipeline(tiny_sdxl_models):
    """diffusers' SDXL pipeline over the same modules (the reference for the conditioning)."""
    models = tiny_sdxl_models
    return StableDiffusionXLPipeline(vae=models.full_vae, text_encoder=models.text_encoder,
                                     text_encoder_2=models.text_encoder_2, tokenizer=models.tokenizer,
                                     tokenizer_2=models.tokenizer_2, unet=models.unet, scheduler=models.scheduler)


def test_tiny_sdxl_is_sdxl_shaped_and_identical_on_every_build(tiny_sdxl_models):
    models = tiny_sdxl_models
    assert models.family == "sdxl" and build_builtin("tiny").family == "sd"
    config = models.unet.config
    assert config.addition_embed_type == "text_time"
    widths = models.text_encoder.config.hidden_size, models.text_encoder_2.config.hidden_size
    assert config.cross_attention_dim == sum(widths)
    assert config.projection_class_embeddings_input_dim == 6 * config.addition_time_embed_dim + \
        models.text_encoder_2.config.projection_dim
    again = build_builtin("tiny-sdxl")
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        for (key, a), b in zip(getattr(models, name).state_dict().items(), getattr(again, name).state_dict().values(),
                               strict=True):
            assert torch.equal(a, b), (name, key)


def test_conditioning_is_diffusers_sdxl_conditioning(tiny_sdxl_models, pipeline):
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            "a red fox", device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry")
    mine, mine_negative = encode_text(tiny_sdxl_models, "a red fox"), encode_text(tiny_sdxl_models, "blurry")
    assert torch.equal(mine.hidden_states, embeds) and torch.equal(mine.pooled, pooled)
    assert torch.equal(mine_negative.hidden_states, negative) and torch.equal(mine_negative.pooled, negative_pooled)
    time_ids = pipeline._get_add_time_ids((48, 64), (0, 0), (48, 64), dtype=torch.float32,
                                          text_encoder_projection_dim=tiny_sdxl_models.text_encoder_2.config.projection_dim)
    assert torch.equal(sdxl_time_ids(48, 64, embeds), time_ids)
    # The `full` layout is the pipeline's CFG batch: negative rows first, each with its pooled embedding.
    stream = StreamEngine(Engine.prepare(tiny_sdxl_models, LoadConfig(model="tiny-sdxl", backend="eager")),
                          make_config(cfg_type="full", width=64, height=48, t_index_list=(45,)))
    conditioning = stream._prompt.layouts[("full", 1)]
    assert torch.equal(conditioning.encoder_hidden_states, torch.cat([negative, embeds]))
    assert torch.equal(conditioning.added_cond["text_embeds"], torch.cat([negative_pooled, pooled]))
    assert torch.equal(conditioning.added_cond["time_ids"], torch.cat([time_ids, time_ids]))


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_kv_cache_is_exact_in_every_mode(tiny_sdxl_models, tiny_sdxl_engine, cfg_type):
    uncached = Engine.prepare(tiny_sdxl_models, LoadConfig(model="tiny-sdxl", kv_cache=False, backend="eager"))
    config = make_config(cfg_type=cfg_type)
    cached, plain = StreamEngine(tiny_sdxl_engine, config), StreamEngine(uncached, config)
    # The cache holds K/V of the concatenated encoder states: exactly what the uncached UNet projects.
    layout = next(iter(cached._prompt.layouts.values()))
    projected = precompute_kv(tiny_sdxl_models.unet, layout.encoder_hidden_states)
    assert projected.keys() == layout.kv_cache.keys()
    assert all(torch.equal(layout.kv_cache[name][part], projected[name][part]) for name in projected for part in (0, 1))
    for index, frame in enumerate(frames(4)):
        if index == 2:
            for stream in (cached, plain):
                stream.update_params(prompt="an oil painting")
        assert torch.equal(cached(frame), plain(frame))


@pytest.mark.parametrize("t_index_list", [(45,), (16, 32, 45)])
@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_stream_batch_equals_sequential_denoising(tiny_sdxl_models, tiny_sdxl_engine, with_runner, cfg_type,
                                                  t_index_list):
    config = make_config(cfg_type=cfg_type, t_index_list=t_index_list)
    stream = StreamEngine(with_runner(tiny_sdxl_engine, RecordingRunner(tiny_sdxl_models)), config)
    sequential = StreamEngine(with_runner(tiny_sdxl_engine, RecordingRunner(tiny_sdxl_models)),
                              config.replace(stream_batch=False))
    inputs = frames(4, seed=1)
    expected = [sequential(frame) for frame in inputs]
    lag = len(t_index_list) - 1
    for index, frame in enumerate(inputs):
        reference = max(0, index - lag)
        torch.testing.assert_close(stream(frame), expected[reference], rtol=0, atol=1e-5)
        torch.testing.assert_close(stream.runner.decoded[index], sequential.runner.decoded[reference],
                                   rtol=1e-4, atol=1e-4)
    assert (sequential.runner.decoded[0] - sequential.runner.decoded[-1]).abs().max() > 1e-3


def test_guidance_and_the_added_conditioning_change_the_output(tiny_sdxl_engine):
    frame = frames(1)[0]
    base = [StreamEngine(tiny_sdxl_engine, make_config(cfg_type=cfg))(frame) for cfg in ("none", "full")]
    assert (base[0] - base[1]).abs().max() > 1e-4
    # The time ids are part of the conditioning: the same prompt at another frame size conditions differently.
    other = StreamEngine(tiny_sdxl_engine, make_config(width=2 * SIZE, height=2 * SIZE))
    first = next(iter(other._prompt.layouts.values())).added_cond["time_ids"][0]
    assert first.tolist() == [2 * SIZE, 2 * SIZE, 0, 0, 2 * SIZE, 2 * SIZE]


def test_similarity_filter_skips_a_still_input(tiny_sdxl_engine):
    stream = StreamEngine(tiny_sdxl_engine, make_config(similarity_filter=True, max_skip_frames=3))
    frame = frames(1)[0]
    outputs = [stream.step(frame) for _ in range(12)]
    assert stream.frames_skipped > 0
    assert all(torch.equal(result.images, outputs[0].images) for result in outputs if result.skipped)


@pytest.mark.parametrize("use_kv_cache", [False, True])
def test_split_forward_passes_the_added_conditioning(tiny_sdxl_models, use_kv_cache):
    unet = tiny_sdxl_models.unet
    install_kv_processors(unet)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 6, 10, generator=generator)
    timesteps = torch.tensor([999, 500, 20])
    states = torch.randn(3, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = tiny_sdxl_models.text_encoder_2.config.projection_dim
    added = {"text_embeds": torch.randn(3, pooled, generator=generator),
             "time_ids": torch.tensor([[48.0, 80, 0, 0, 48, 80]]).expand(3, -1)}
    conditioning = Conditioning(states, precompute_kv(unet, states) if use_kv_cache else None, added)
    with torch.no_grad():
        expected = unet(latents, timesteps, return_dict=False, **conditioning.unet_kwargs())[0]
        assert torch.equal(split_unet_forward(unet, latents, timesteps, conditioning), expected)
        without = unet(latents, timesteps, encoder_hidden_states=states, return_dict=False,
                       added_cond_kwargs={**added, "text_embeds": torch.zeros(3, pooled)})[0]
    assert (expected - without).abs().max() > 1e-4  # the pooled embedding really reaches the output


@pytest.mark.parametrize("policy", ["rehash", "adacache"])
def test_a_skip_policy_that_skips_nothing_equals_off_exactly(tiny_sdxl_engine, policy):
    never_reuse = dict(skip_max_age=1, rehash_interval=1, adacache_codebook=((1e9, 1),))
    inputs = frames(5, seed=2)
    reference_stream = StreamEngine(tiny_sdxl_engine, make_config(t_index_list=(16, 32, 45)))
    reference = [reference_stream(frame) for frame in inputs]
    stream = StreamEngine(tiny_sdxl_engine, make_config(t_index_list=(16, 32, 45), skip_policy=policy, **never_reuse))
    for frame, expected in zip(inputs, reference, strict=True):
        assert torch.equal(stream(frame), expected)
    # On a still input the default settings reuse rows (gathered subsets of the batch, added inputs included)
    # with no error beyond float rounding.
    config = make_config(t_index_list=(16, 32, 45), cfg_type="full")
    still = [inputs[0]] * 6
    reference_stream = StreamEngine(tiny_sdxl_engine, config)
    reference = [reference_stream(frame) for frame in still]
    reusing = StreamEngine(tiny_sdxl_engine, config.replace(skip_policy=policy))
    for frame, expected in zip(still, reference, strict=True):
        torch.testing.assert_close(reusing(frame), expected, rtol=0, atol=1e-5)
    assert reusing.skip_policy.stats.skip_rate > 0.4


def test_sessions_batch_and_each_equals_itself_alone(tiny_sdxl_models, tiny_sdxl_engine, with_runner):
    runner = CountingRunner(tiny_sdxl_models)
    sessions = [dict(prompt="a fox", cfg_type="self"), dict(prompt="a city", cfg_type="full", seed=7),
                dict(prompt="a sketch", cfg_type="initialize", guidance_scale=1.3)]
    counting = with_runner(tiny_sdxl_engine, runner)
    batched = [StreamEngine(counting, make_config(**changes)) for changes in sessions]
    alone = [StreamEngine(tiny_sdxl_engine, make_config(**changes)) for changes in sessions]
    assert len({batch_key(engine) for engine in batched}) == 1
    streams = [frames(3, seed=index) for index in range(len(sessions))]
    for step in range(3):
        runner.unet_rows.clear()
        results = step_batch(batched, [clip[step] for clip in streams])
        if step > 0:
            assert len(runner.unet_rows) == 1
        for engine, result, clip in zip(alone, results, streams, strict=True):
            torch.testing.assert_close(result.images, engine.step(clip[step]).images, atol=1e-5, rtol=0)


def test_saved_folder_loads_as_sdxl_here_and_in_diffusers(tiny_sdxl_models, tmp_path):
    folder = tmp_path / "tiny-sdxl"
    tiny_sdxl_models.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and "text_encoder_2" in index
    loaded = load_models(str(folder))
    assert loaded.family == "sdxl"
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        expected = getattr(tiny_sdxl_models, name).state_dict().values()
        for a, b in zip(getattr(loaded, name).state_dict().values(), expected, strict=True):
            assert torch.equal(a, b), name
    config = make_config()
    outputs = [StreamEngine(Engine.prepare(models, LoadConfig(model=models.name, backend="eager")),
                            config)(frames(1)[0])
               for models in (loaded, load_models("tiny-sdxl"))]
    assert torch.equal(outputs[0], outputs[1])
    pipe = AutoPipelineForImage2Image.from_pretrained(folder)
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"


def test_sdxl_defaults_to_taesdxl_and_loads_from_the_hub_cache(tiny_sdxl_models, tmp_path):
    folder = tmp_path / "sdxl-turbo"
    tiny_sdxl_models.save_pretrained(folder)
    taesdxl = tmp_path / "taesdxl"
    tiny_sdxl_models.vae.save_pretrained(taesdxl)
    (folder / "model_index.json").rename(tmp_path / "index.json")
    with pytest.raises(ModelLoadError, match="not a diffusers folder"):
        load_models(str(folder))
    (tmp_path / "index.json").rename(folder / "model_index.json")
    for child in (folder / "vae_tiny").iterdir():
        child.unlink()
    (folder / "vae_tiny").rmdir()
    with pytest.raises(ModelLoadError, match=f"'{DEFAULT_TAESDXL}'.*offline mode is on"):
        load_models(str(folder))
    add_to_hub_cache(tmp_path / "hub", "stabilityai/sdxl-turbo", folder)
    add_to_hub_cache(tmp_path / "hub", DEFAULT_TAESDXL, taesdxl)
    loaded = load_models("stabilityai/sdxl-turbo")
    assert loaded.family == "sdxl" and DEFAULT_TAESDXL == "madebyollin/taesdxl"
    for a, b in zip(loaded.text_encoder_2.state_dict().values(), tiny_sdxl_models.text_encoder_2.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)


def test_an_sdxl_single_file_loads_like_its_folder(tiny_sdxl_models, tmp_path):
    """An SGM-layout checkpoint (`conditioner.embedders.1.*` holds the second encoder) loads as SDXL through
    `StableDiffusionXLPipeline.from_single_file`, with a saved folder as its config, offline."""
    folder = tmp_path / "config"
    tiny_sdxl_models.save_pretrained(folder)
    path = tmp_path / "tiny-sdxl.safetensors"
    models = tiny_sdxl_models
    save_file(sdxl_bundle_to_ldm(models.unet, models.full_vae, models.text_encoder, models.text_encoder_2), str(path))
    loaded = load_models(str(path), config=str(folder), use_tiny_vae=False)
    assert loaded.family == "sdxl"
    for name, expected in (("unet", models.unet), ("text_encoder", models.text_encoder),
                           ("text_encoder_2", models.text_encoder_2), ("vae", models.full_vae)):
        state, reference = getattr(loaded, name).state_dict(), expected.state_dict()
        assert state.keys() == reference.keys(), name
        assert all(torch.equal(state[key], tensor) for key, tensor in reference.items()), name
    with pytest.raises(ModelLoadError, match="without a config.*offline mode is on"):
        load_models(str(path))


@pytest.mark.parametrize("memory", ["slice", "group"])
def test_memory_modes_run_sdxl_like_off(memory):
    config = make_config(cfg_type="full", width=64, height=64)
    outputs = []
    for mode in ("off", memory):
        models = load_models("tiny-sdxl")
        load = LoadConfig(model="tiny-sdxl", memory=mode, backend="eager")
        stream = StreamEngine(Engine.prepare(models, load), config)
        outputs.append([stream(frame) for frame in frames(3, size=64)])
    for sliced, whole in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(sliced, whole, rtol=0, atol=1e-5)
