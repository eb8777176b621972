"""`engine.loading`: one way from load-time settings to models on their device and dtype."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, LoadConfig, load_bundle
from engine.loading import resolve_device, resolve_dtype
from engine.models import build_builtin

NETWORKS = ("text_encoder", "unet", "vae")


def test_load_bundle_puts_every_network_on_the_configured_device_and_dtype():
    models = load_bundle(LoadConfig(model="tiny", device="cpu", dtype="bfloat16"))
    assert models.name == "tiny"
    for name in NETWORKS:
        parameters = list(getattr(models, name).parameters())
        assert {p.dtype for p in parameters} == {torch.bfloat16} and {p.device.type for p in parameters} == {"cpu"}
        assert not getattr(models, name).training and not any(p.requires_grad for p in parameters)


def test_load_bundle_passes_every_load_time_setting(monkeypatch):
    calls = []

    def fake_load_models(spec, **kwargs):
        calls.append((spec, kwargs))
        return build_builtin("tiny")

    monkeypatch.setattr("engine.loading.load_models", fake_load_models)
    load_bundle(LoadConfig(model="model.safetensors", vae="full", taesd="taesd-folder",
                           model_config="config-folder", device="cpu", dtype="float32"))
    assert calls == [("model.safetensors", {"use_tiny_vae": False, "taesd": "taesd-folder",
                                            "config": "config-folder"})]


@pytest.mark.parametrize("cuda", [False, True])
def test_auto_is_cuda_in_fp16_when_present_else_cpu_in_fp32(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    device = resolve_device("auto")
    assert device.type == ("cuda" if cuda else "cpu")
    assert resolve_dtype("auto", device) == (torch.float16 if cuda else torch.float32)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_dtype("bfloat16", device) == torch.bfloat16


def test_engine_load_prepares_the_bundle_it_loads(monkeypatch):
    """`Engine.load` is `load_bundle` then `Engine.prepare`: device and dtype are the loaded models', the
    attention processors are ours (with or without a K/V cache: streams' banks reach them too), and the load
    config is kept as given."""
    from engine.prompt import CachedKVAttnProcessor

    config = LoadConfig(model="tiny", device="cpu", dtype="bfloat16", vae="full", backend="eager")
    engine = Engine.load(config)
    assert engine.config is config and engine.name == "tiny"
    assert (engine.device, engine.dtype) == (torch.device("cpu"), torch.bfloat16)
    assert type(engine.models.vae).__name__ == "AutoencoderKL"
    assert all(isinstance(p, CachedKVAttnProcessor) for p in engine.models.unet.attn_processors.values())
    uncached = Engine.load(config.replace(kv_cache=False, vae="tiny"))
    assert all(isinstance(p, CachedKVAttnProcessor) for p in uncached.models.unet.attn_processors.values())
    assert uncached.config.kv_cache is False
    assert type(uncached.models.vae).__name__ == "AutoencoderTiny"
