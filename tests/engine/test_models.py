"""Model loading: built-ins, saved folders, diffusers-saved folders, single files and bad specs.

Everything runs offline: the hub is switched to offline mode with an empty cache for the whole
module, and every checkpoint is built from the tiny model and saved by the tests themselves.
"""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, PNDMScheduler, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from ldm_layout import bundle_to_ldm
from safetensors.torch import save_file

from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.models import (
    BUILTIN_MODELS,
    DEFAULT_HUB_MODEL,
    DEFAULT_TAESD,
    ModelBundle,
    ModelLoadError,
    build_builtin,
    load_models,
)

SIZE = 64
NETWORKS = ("unet", "text_encoder", "vae")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module", autouse=True)
def offline_hub(tmp_path_factory):
    """No test here may reach the network: offline mode and an empty hub cache."""
    cache = tmp_path_factory.mktemp("hf_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield


@pytest.fixture(scope="module")
def source() -> ModelBundle:
    """The tiny model every saved artefact below is made from."""
    return build_builtin("tiny")


@pytest.fixture(scope="module")
def saved_folder(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    source.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def taesd_folder(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("taesd") / "taesd"
    source.vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_folder(source, tmp_path_factory):
    """A folder written by diffusers itself, with another scheduler class and no `vae_tiny/`."""
    pipe = StableDiffusionPipeline(
        vae=source.full_vae, text_encoder=source.text_encoder, tokenizer=source.tokenizer, unet=source.unet,
        scheduler=PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("pipeline") / "sd"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single_file(source, tmp_path_factory):
    """The tiny model as one checkpoint in the original SD (LDM) layout."""
    path = tmp_path_factory.mktemp("single") / "tiny-sd.safetensors"
    save_file(bundle_to_ldm(source.unet, source.full_vae, source.text_encoder), str(path))
    return path


def assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    for name, tensor in expected_state.items():
        assert torch.equal(actual_state[name], tensor), name


def first_outputs(models: ModelBundle, frames: int = 2) -> list[torch.Tensor]:
    """The engine's outputs for fixed random frames (fp32 on the CPU): the first comes out of priming."""
    models.to(torch.device("cpu"), torch.float32)
    load = LoadConfig(model=models.name, device="cpu", dtype="float32", backend="eager")
    engine = StreamEngine(Engine.prepare(models, load), StreamConfig(width=SIZE, height=SIZE, similarity_filter=False))
    generator = torch.Generator().manual_seed(5)
    return [engine(torch.rand(3, SIZE, SIZE, generator=generator)) for _ in range(frames)]


def schedule_settings(models: ModelBundle) -> dict:
    return {key: value for key, value in models.scheduler.config.items() if not key.startswith("_")}


def assert_same_outputs(actual: ModelBundle, expected: ModelBundle) -> None:
    for got, want in zip(first_outputs(actual), first_outputs(expected), strict=True):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- built-ins


def test_tiny_is_identical_on_every_build():
    first, second = build_builtin("tiny"), build_builtin("tiny")
    for name in (*NETWORKS, "full_vae"):
        assert_same_weights(getattr(first, name), getattr(second, name))
    other_seed = build_builtin("tiny", seed=1)
    assert not torch.equal(other_seed.unet.conv_in.weight, first.unet.conv_in.weight)


def test_building_a_builtin_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_builtin("tiny")
    assert torch.equal(torch.rand(4), expected)


def test_tiny_weights_match_pinned_values(source):
    # Regression pins (torch 2.13 CPU): a change means every machine's `tiny` changed too.
    torch.testing.assert_close(
        source.unet.conv_in.weight.flatten()[:4],
        torch.tensor([-0.08580327033996582, 0.16264310479164124, 0.09740164130926132, 0.0803675502538681]),
        rtol=0, atol=1e-7,
    )
    torch.testing.assert_close(
        source.text_encoder.embeddings.token_embedding.weight.flatten()[:3],
        torch.tensor([-0.06105593591928482, -0.0111449109390378, -0.01623373106122017]), rtol=0, atol=1e-7,
    )
    pinned_abs_sums = {"unet": 37846.33172262636, "text_encoder": 2581.303082009562, "vae": 6712.090419405666,
                       "full_vae": 4195.874462848268}
    for name, expected in pinned_abs_sums.items():
        total = sum(parameter.double().abs().sum().item() for parameter in getattr(source, name).parameters())
        assert total == pytest.approx(expected, rel=1e-9), name


def test_small_has_tens_of_millions_of_unet_parameters():
    small = build_builtin("small")
    count = sum(parameter.numel() for parameter in small.unet.parameters())
    assert 10_000_000 <= count < 100_000_000
    assert count > 10 * sum(parameter.numel() for parameter in build_builtin("tiny").unet.parameters())


# The real models' parameter counts (their diffusers/transformers checkpoints): the real-size built-ins must be
# those architectures, so what they measure on a GPU is what the real weights cost.
REAL_COUNTS = {
    "sd-turbo-random": {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 2_445_063, "full_vae": 83_653_863},
    "sdxl-turbo-random": {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840,
                          "vae": 2_445_063, "full_vae": 83_653_863},
}


@pytest.mark.parametrize("name", sorted(REAL_COUNTS))
def test_real_size_builtins_have_the_real_architectures(name):
    from engine.builtin_models import build_modules

    with torch.device("meta"):  # counted without allocating 3-13 GB
        modules = build_modules(name)
    parts = {"unet": modules.unet, "text_encoder": modules.text_encoder, "vae": modules.tiny_vae,
             "full_vae": modules.full_vae, "text_encoder_2": modules.text_encoder_2}
    counts = {part: sum(p.numel() for p in module.parameters()) for part, module in parts.items() if module is not None}
    assert counts == REAL_COUNTS[name]
    assert (modules.unet.config.addition_embed_type == "text_time") == (name == "sdxl-turbo-random")


def test_builtin_names_and_vae_choice():
    assert set(BUILTIN_MODELS) == {"tiny", "small", "tiny-sdxl", "sd-turbo-random", "sdxl-turbo-random"}
    assert isinstance(load_models("tiny").vae, AutoencoderTiny)
    full = load_models("tiny", use_tiny_vae=False)
    assert isinstance(full.vae, AutoencoderKL) and full.vae is full.full_vae


def test_tokenizer_tokenizes_offline(source):
    tokenizer = source.tokenizer
    ids = tokenizer("a red fox", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredfox"
    other = tokenizer("a blue fox", padding="max_length", max_length=77, truncation=True).input_ids
    assert other != ids
    assert max(ids) < source.text_encoder.config.vocab_size


# --------------------------------------------------------------------------- local diffusers folders


def test_saved_folder_round_trips(source, saved_folder):
    loaded = load_models(str(saved_folder))
    for name in NETWORKS:
        assert_same_weights(getattr(loaded, name), getattr(source, name))
    assert isinstance(loaded.vae, AutoencoderTiny)
    assert isinstance(loaded.scheduler, LCMScheduler)
    assert schedule_settings(loaded) == schedule_settings(source)
    assert loaded.tokenizer.get_vocab() == source.tokenizer.get_vocab()
    assert_same_outputs(loaded, build_builtin("tiny"))


def test_saved_folder_with_full_vae(source, saved_folder):
    loaded = load_models(str(saved_folder), use_tiny_vae=False)
    assert isinstance(loaded.vae, AutoencoderKL)
    assert_same_weights(loaded.vae, source.full_vae)


def test_saved_folder_is_a_diffusers_pipeline_folder(source, saved_folder):
    # The benchmark runs diffusers' own pipelines on the same folder.
    pipe = StableDiffusionPipeline.from_pretrained(saved_folder)
    assert_same_weights(pipe.unet, source.unet)
    assert_same_weights(pipe.vae, source.full_vae)
    assert json.loads((saved_folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]


def test_diffusers_saved_pipeline_with_full_vae(source, pipeline_folder):
    loaded = load_models(str(pipeline_folder), use_tiny_vae=False)
    assert_same_weights(loaded.unet, source.unet)
    assert_same_weights(loaded.text_encoder, source.text_encoder)
    assert_same_weights(loaded.vae, source.full_vae)
    # The PNDM schedule is converted, not replaced: same noise levels.
    assert isinstance(loaded.scheduler, LCMScheduler)
    pndm = PNDMScheduler.from_pretrained(pipeline_folder / "scheduler")
    assert torch.equal(loaded.scheduler.alphas_cumprod, pndm.alphas_cumprod)


def test_diffusers_saved_pipeline_with_separate_taesd(source, pipeline_folder, taesd_folder):
    loaded = load_models(str(pipeline_folder), taesd=str(taesd_folder))
    assert isinstance(loaded.vae, AutoencoderTiny)
    assert_same_weights(loaded.vae, source.vae)
    assert loaded.full_vae is None  # only read with `--vae full`


def test_folder_without_taesd_names_the_default_taesd_when_offline(pipeline_folder):
    with pytest.raises(ModelLoadError) as error:
        load_models(str(pipeline_folder))
    message = str(error.value)
    assert DEFAULT_TAESD in message and "vae_tiny/" in message and "offline" in message
    assert "--taesd" in message and "--vae full" in message


def test_v_prediction_models_are_refused(saved_folder, tmp_path):
    folder = tmp_path / "vpred"
    shutil.copytree(saved_folder, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(ModelLoadError, match="v_prediction.*ε-prediction"):
        load_models(str(folder))


# --------------------------------------------------------------------------- single files


def test_ldm_layout_inverts_diffusers_conversion(source):
    checkpoint = bundle_to_ldm(source.unet, source.full_vae, source.text_encoder)
    assert all(name.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
               for name in checkpoint)
    unet = convert_ldm_unet_checkpoint(checkpoint, dict(source.unet.config))
    vae = convert_ldm_vae_checkpoint(checkpoint, dict(source.full_vae.config))
    clip_state = convert_ldm_clip_checkpoint(checkpoint)
    clip = {name.removeprefix("text_model."): tensor for name, tensor in clip_state.items()}
    for converted, module in ((unet, source.unet), (vae, source.full_vae), (clip, source.text_encoder)):
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[name], expected[name]) for name in expected)


def test_single_file_loads_like_the_folder(source, single_file, saved_folder):
    loaded = load_models(str(single_file), config=str(saved_folder))
    for name in NETWORKS:  # the tiny VAE comes from the config folder's vae_tiny/
        assert_same_weights(getattr(loaded, name), getattr(source, name))
    assert loaded.full_vae is None  # read from the file, but not kept while the tiny VAE runs
    assert schedule_settings(loaded) == schedule_settings(source)
    assert_same_outputs(loaded, build_builtin("tiny"))


def test_single_file_with_full_vae_and_a_diffusers_config(source, single_file, pipeline_folder, taesd_folder):
    loaded = load_models(str(single_file), config=str(pipeline_folder), use_tiny_vae=False)
    assert_same_weights(loaded.vae, source.full_vae)
    assert_same_weights(loaded.unet, source.unet)
    assert isinstance(loaded.scheduler, LCMScheduler)
    with_taesd = load_models(str(single_file), config=str(pipeline_folder), taesd=str(taesd_folder))
    assert_same_weights(with_taesd.vae, source.vae)


def test_single_file_without_config_says_to_pass_one(single_file):
    with pytest.raises(ModelLoadError) as error:
        load_models(str(single_file))
    message = str(error.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in message  # what diffusers inferred and tried
    assert "--model-config FOLDER" in message and "offline" in message


@pytest.mark.parametrize(
    ("dropped", "expected"),
    [
        ("model.diffusion_model.out.2.weight", r"lacks weights that the config's architecture has"),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight",
         r"lacks 1 weights of the text encoder \(e.g. 'final_layer_norm.weight'\)"),
    ],
    ids=["unet", "text-encoder"],
)
def test_single_file_missing_weights_are_reported(source, saved_folder, tmp_path, dropped, expected):
    checkpoint = bundle_to_ldm(source.unet, source.full_vae, source.text_encoder)
    del checkpoint[dropped]
    path = tmp_path / "truncated.safetensors"
    save_file(checkpoint, str(path))
    with pytest.raises(ModelLoadError, match=expected):
        load_models(str(path), config=str(saved_folder))


# --------------------------------------------------------------------------- bad specs


def _write(path, content: bytes):
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    ("make_spec", "expected"),
    [
        (lambda tmp: str(tmp / "no" / "such" / "folder"), r"model path .* does not exist.*`tiny`"),
        (lambda tmp: "./no-such-model", r"does not exist"),
        (lambda tmp: str(tmp / "missing.safetensors"), r"checkpoint file .* does not exist"),
        (lambda tmp: str(tmp), r"is not a diffusers folder \(missing model_index.json, unet, scheduler\)"),
        (lambda tmp: _write(tmp / "junk.safetensors", b"not a checkpoint"), r"not a readable safetensors"),
        (lambda tmp: _write(tmp / "notes.txt", b"hello"), r"is a file but not a checkpoint"),
        (lambda tmp: "", r"empty model spec"),
        (lambda tmp: "not a model!",
         r"neither a built-in \(tiny, small, tiny-sdxl, sd-turbo-random, sdxl-turbo-random\), an existing path, nor"),
    ],
    ids=["missing-folder", "missing-relative", "missing-file", "not-diffusers", "junk-file", "not-checkpoint",
         "empty", "malformed"],
)
def test_bad_specs_say_what_was_tried(tmp_path, make_spec, expected):
    with pytest.raises(ModelLoadError, match=expected):
        load_models(make_spec(tmp_path))


def test_safetensors_that_is_not_a_stable_diffusion_checkpoint(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match=r"no `model.diffusion_model.\*` weights among its 1 tensors"):
        load_models(str(path))


def test_folder_missing_a_component(saved_folder, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(saved_folder, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(ModelLoadError, match=r"could not load the diffusers folder .*It needs tokenizer/"):
        load_models(str(no_tokenizer))
    no_vae = tmp_path / "no-vae"
    shutil.copytree(saved_folder, no_vae, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(ModelLoadError, match=r"has no full VAE \(no vae/ folder\)"):
        load_models(str(no_vae), use_tiny_vae=False)


def test_single_file_config_must_exist(single_file, tmp_path):
    with pytest.raises(ModelLoadError, match="neither an existing diffusers folder nor a hub id"):
        load_models(str(single_file), config=str(tmp_path / "nowhere" / "x"))
    with pytest.raises(ModelLoadError, match="model config .* is not a diffusers folder"):
        load_models(str(single_file), config=str(tmp_path))


@pytest.mark.parametrize("repo_id", [DEFAULT_HUB_MODEL, "someone/some-model"])
def test_hub_id_offline_suggests_a_local_path_or_tiny(repo_id):
    assert DEFAULT_HUB_MODEL == "stabilityai/sd-turbo"
    with pytest.raises(ModelLoadError) as error:
        load_models(repo_id)
    message = str(error.value)
    assert repr(repo_id) in message and "offline mode is on: HF_HUB_OFFLINE=1" in message
    assert "local diffusers folder" in message and "`tiny`" in message


def add_to_hub_cache(cache, repo_id: str, folder) -> None:
    """Lay `folder` out as the cached snapshot of `repo_id`, as `huggingface_hub` would after a download."""
    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    shutil.copytree(folder, repo / "snapshots" / revision)


def test_hub_ids_load_from_the_hub_cache_offline(source, pipeline_folder, taesd_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    add_to_hub_cache(tmp_path, DEFAULT_HUB_MODEL, pipeline_folder)
    add_to_hub_cache(tmp_path, DEFAULT_TAESD, taesd_folder)
    loaded = load_models(DEFAULT_HUB_MODEL)  # the tiny VAE defaults to the (cached) DEFAULT_TAESD
    assert loaded.name == DEFAULT_HUB_MODEL
    assert_same_weights(loaded.unet, source.unet)
    assert_same_weights(loaded.vae, source.vae)
    assert_same_weights(load_models(DEFAULT_HUB_MODEL, use_tiny_vae=False).vae, source.full_vae)


def test_missing_taesd(tmp_path):
    with pytest.raises(ModelLoadError, match=r"TAESD folder .* does not exist.*--vae full"):
        load_models("tiny", taesd=str(tmp_path / "no-taesd"))
    with pytest.raises(ModelLoadError, match=r"TAESD folder .* has no config.json"):
        load_models("tiny", taesd=str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"'{DEFAULT_TAESD}'.*offline mode is on.*--taesd FOLDER"):
        load_models("tiny", taesd=DEFAULT_TAESD)


def test_explicit_taesd_replaces_the_builtin_tiny_vae(source, taesd_folder):
    loaded = load_models("tiny", taesd=str(taesd_folder), seed=3)
    assert_same_weights(loaded.vae, source.vae)
