"""LoRA at load time: fused weights equal the peft adapters active, scale 0 is no LoRA, bad LoRAs fail by name.

Every LoRA here is made by the test with peft on a fresh built-in model (`lora_files.make_lora`), saved in the
diffusers format (peft config as metadata, α ≠ r) or the kohya format (`.alpha` tensors, `text_model.` names).
"""

from __future__ import annotations

import argparse

import huggingface_hub.constants
import pytest
import torch
from lora_files import make_lora, set_reference_scale
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from test_models import add_to_hub_cache

from engine import Engine, LoadConfig, StreamConfig, StreamEngine, load_bundle, load_models
from engine.backends.artifacts import GraphShape, OnnxCache
from engine.backends.cache import engine_cache_key, module_fingerprint
from engine.config import LoraSpec, parse_lora_spec
from engine.flags import add_flags, configs_from, engine_flags
from engine.lora import apply_loras, resolve_lora_file
from engine.models import ModelLoadError
from engine.prompt import encode_prompt

SIZE = 64
CONFIG = StreamConfig(width=SIZE, height=SIZE, similarity_filter=False, prompt="a red fox")


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """No test here may reach the network: offline mode and an empty hub cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("lora") / "style")


def outputs(models, loras=(), frames: int = 3) -> list[torch.Tensor]:
    stream = StreamEngine(Engine.prepare(models, LoadConfig(model=models.name, loras=loras, backend="eager")), CONFIG)
    generator = torch.Generator().manual_seed(3)
    return [stream(torch.rand(3, SIZE, SIZE, generator=generator)) for _ in range(frames)]


def fused(path, scale: float = 1.0, model: str = "tiny"):
    spec = LoraSpec(str(path), scale)
    return load_bundle(LoadConfig(model=model, loras=(spec,), device="cpu", dtype="float32")), (spec,)


def assert_no_adapter_layers(models) -> None:
    for module in (models.unet, *models.text_encoders().values()):
        assert not any(isinstance(layer, BaseTunerLayer) for layer in module.modules())
        assert not hasattr(module, "peft_config")


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_fused_lora_equals_the_peft_adapters_active_and_changes_the_output(tmp_path, fmt):
    path, reference = make_lora(tmp_path / fmt, fmt=fmt)
    set_reference_scale(reference, 0.7)
    models, loras = fused(path, 0.7)
    assert models.loras == loras
    assert_no_adapter_layers(models)
    plain = outputs(load_models("tiny"))
    for got, want, base in zip(outputs(models, loras), outputs(reference), plain, strict=True):
        # W·x + s·B·A·x (adapters) against (W + s·B·A)·x (fused): the same up to float rounding.
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - base).abs().max() > 1e-2
    # The text encoder got its share: its output is the reference's, not the base model's.
    with torch.no_grad():
        texts = [encode_prompt(each.tokenizer, each.text_encoder, "a red fox")
                 for each in (models, reference, load_models("tiny"))]
    torch.testing.assert_close(texts[0], texts[1], rtol=0, atol=1e-5)
    assert (texts[0] - texts[2]).abs().max() > 1e-2


def test_both_formats_of_one_lora_fuse_to_the_same_weights(tmp_path):
    diffusers_path, _ = make_lora(tmp_path / "d", fmt="diffusers", alpha=4.0)
    kohya_path, _ = make_lora(tmp_path / "k", fmt="kohya", alpha=4.0)
    one, two = fused(diffusers_path)[0], fused(kohya_path)[0]
    for name in ("unet", "text_encoder"):
        for (key, a), b in zip(getattr(one, name).state_dict().items(), getattr(two, name).state_dict().values(),
                               strict=True):
            assert torch.equal(a, b), key


def test_scale_zero_is_no_lora_and_keeps_the_cache_key(diffusers_lora):
    path, _ = diffusers_lora
    models, loras = fused(path, 0.0)
    plain = load_models("tiny")
    for got, want in zip(outputs(models, loras), outputs(plain), strict=True):
        assert torch.equal(got, want)
    assert module_fingerprint(models.unet) == module_fingerprint(plain.unet)


def test_the_cache_key_holds_the_lora_set_and_scales(diffusers_lora, tmp_path):
    path, _ = diffusers_lora
    shape = GraphShape("unet", 2, SIZE, SIZE, True, 77)
    keys = {}
    for name, models in {"none": load_models("tiny"), "half": fused(path, 0.5)[0], "full": fused(path, 1.0)[0]}.items():
        cache = OnnxCache(models, "self", tmp_path)
        keys[name] = (cache.key_parts(shape), cache.key_parts(GraphShape("vae_decoder", 1, SIZE, SIZE)))
    unet_keys = {name: engine_cache_key(parts) for name, (parts, _) in keys.items()}
    assert len(set(unet_keys.values())) == 3  # the fused weights alone change the key
    assert len({parts.model_hash for parts, _ in keys.values()}) == 3
    assert keys["none"][0].loras == () and keys["half"][0].loras == (f"{path}:0.5",)
    # The VAE graphs are the same with any LoRA.
    assert len({engine_cache_key(vae) for _, vae in keys.values()}) == 1


def test_loras_stack_in_order(tmp_path):
    first, _ = make_lora(tmp_path / "a", seed=1, text=False)
    second, _ = make_lora(tmp_path / "b", seed=2, text=False)
    both = load_bundle(LoadConfig(model="tiny", loras=(f"{first}:0.5", f"{second}:0.25"), dtype="float32"))
    assert [str(spec) for spec in both.loras] == [f"{first}:0.5", f"{second}:0.25"]
    base, one, two = load_models("tiny"), fused(first, 0.5)[0], fused(second, 0.25)[0]
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    weights = [model.unet.state_dict()[name] for model in (base, one, two, both)]
    torch.testing.assert_close(weights[3] - weights[0], (weights[1] - weights[0]) + (weights[2] - weights[0]),
                               rtol=0, atol=1e-6)


def test_a_lora_for_another_architecture_fails_by_name(tmp_path):
    path, _ = make_lora(tmp_path / "small", model="small", text=False)
    with pytest.raises(ModelLoadError, match=rf"LoRA '{path}'.*(another model|does not fit)"):
        fused(path)


def test_a_lora_with_wrong_shapes_fails_by_name_and_leaves_no_adapter(diffusers_lora, tmp_path):
    path, _ = diffusers_lora
    weights = load_file(str(path))
    key = next(key for key in weights if key.startswith("unet.") and key.endswith("lora.down.weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 3)
    broken = tmp_path / "broken.safetensors"
    save_file(weights, str(broken))
    models = load_models("tiny")
    with pytest.raises(ModelLoadError, match=rf"LoRA '{broken}' does not fit this SD model.*size mismatch"):
        apply_loras(models, (LoraSpec(str(broken)),))
    assert_no_adapter_layers(models)
    assert models.loras == ()


def test_a_lora_of_another_family_or_no_lora_at_all_fails_by_name(tmp_path):
    foreign = tmp_path / "flux.safetensors"
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 8),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 4)}, str(foreign))
    with pytest.raises(ModelLoadError, match=rf"LoRA '{foreign}' has 2 weights for no part of this SD model.*"
                                             "another model family"):
        fused(foreign)
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(4)}, str(checkpoint))
    with pytest.raises(ModelLoadError, match=rf"LoRA '{checkpoint}' holds no LoRA weights"):
        fused(checkpoint)


def test_missing_and_ambiguous_sources_fail_by_name(tmp_path):
    with pytest.raises(ModelLoadError, match=r"LoRA '.*nope.safetensors' does not exist"):
        resolve_lora_file(str(tmp_path / "nope.safetensors"))
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "two" / name))
    with pytest.raises(ModelLoadError, match=r"holds 2 .safetensors files \(a.safetensors, b.safetensors\)"):
        resolve_lora_file(str(tmp_path / "two"))
    with pytest.raises(ModelLoadError, match=r"could not fetch LoRA 'someone/style'.*HF_HUB_OFFLINE=1"):
        resolve_lora_file("someone/style")


def test_lcm_lora_by_hub_id_on_a_saved_sd_folder(diffusers_lora, tmp_path, monkeypatch):
    """`--model <folder> --lora latent-consistency/lcm-lora-sdv1-5`, served from the hub cache offline."""
    path, reference = diffusers_lora
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "latent-consistency/lcm-lora-sdv1-5", path.parent)
    folder = tmp_path / "sd15"
    load_models("tiny").save_pretrained(folder)
    models = load_bundle(LoadConfig(model=str(folder), loras=("latent-consistency/lcm-lora-sdv1-5",),
                                    dtype="float32"))
    assert type(models.scheduler).__name__ == "LCMScheduler"
    reference.name = str(folder)
    for got, want in zip(outputs(models, models.loras), outputs(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_prepare_refuses_models_whose_loras_differ_from_the_config(diffusers_lora):
    path, _ = diffusers_lora
    with pytest.raises(ValueError, match=r"`loras`: the models have no LoRA fused"):
        Engine.prepare(load_models("tiny"), LoadConfig(model="tiny", loras=(str(path),), backend="eager"))


@pytest.mark.parametrize(("text", "expected"), [
    ("latent-consistency/lcm-lora-sdv1-5", LoraSpec("latent-consistency/lcm-lora-sdv1-5", 1.0)),
    ("owner/style:0.6", LoraSpec("owner/style", 0.6)),
    ("./loras/x.safetensors:-1", LoraSpec("./loras/x.safetensors", -1.0)),
    ("C:\\loras\\x.safetensors", LoraSpec("C:\\loras\\x.safetensors", 1.0)),
    ("C:\\loras\\x.safetensors:2", LoraSpec("C:\\loras\\x.safetensors", 2.0)),
])
def test_lora_specs_parse(text, expected):
    assert parse_lora_spec(text) == expected
    assert parse_lora_spec(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "  ", "style:nan", "style:inf"])
def test_bad_lora_specs_are_refused(text):
    with pytest.raises(ValueError, match="`loras`"):
        parse_lora_spec(text)


def test_the_lora_flag_repeats():
    parser = argparse.ArgumentParser()
    add_flags(parser, engine_flags("load"))
    args = parser.parse_args(["--model", "tiny", "--lora", "a/b", "--lora", "./c.safetensors:0.5"])
    load, _, _ = configs_from(vars(args))
    assert load.loras == (LoraSpec("a/b"), LoraSpec("./c.safetensors", 0.5))
    assert configs_from(vars(parser.parse_args([])))[0].loras == ()


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_an_sdxl_lora_fuses_into_the_unet_and_both_text_encoders(tmp_path, fmt):
    path, reference = make_lora(tmp_path / fmt, model="tiny-sdxl", fmt=fmt)
    set_reference_scale(reference, 0.8)
    models, loras = fused(path, 0.8, model="tiny-sdxl")
    assert_no_adapter_layers(models)
    plain = outputs(load_models("tiny-sdxl"))
    for got, want, base in zip(outputs(models, loras), outputs(reference), plain, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert (got - base).abs().max() > 1e-2
    base = load_models("tiny-sdxl")
    for name in ("text_encoder", "text_encoder_2"):
        weight = "text_model.encoder.layers.0.self_attn.q_proj.weight"
        keys = [key for key in getattr(models, name).state_dict() if key.endswith(weight.removeprefix("text_model."))]
        fused_weight, base_weight = (getattr(each, name).state_dict()[keys[0]] for each in (models, base))
        assert not torch.equal(fused_weight, base_weight), name


def test_a_lora_of_the_other_family_fails_by_name(tmp_path):
    sdxl_lora, _ = make_lora(tmp_path / "xl", model="tiny-sdxl")
    with pytest.raises(ModelLoadError, match=rf"LoRA '{sdxl_lora}' has 16 weights for no part of this SD model "
                                             r"\(e\.g\. 'text_encoder_2\..*another model family"):
        fused(sdxl_lora)
    sd_lora, _ = make_lora(tmp_path / "sd", text=False)
    models = load_models("tiny-sdxl")
    with pytest.raises(ModelLoadError, match=rf"LoRA '{sd_lora}' does not fit this SDXL model .*size mismatch"):
        apply_loras(models, (LoraSpec(str(sd_lora)),))
    assert_no_adapter_layers(models)
