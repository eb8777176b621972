"""The engine cache: keys that change with each part, atomic writes, corrupt files rebuilt."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from engine.backends.artifacts import GraphShape
from engine.backends.cache import (
    CacheKeyParts,
    atomic_write,
    cached_artifact,
    engine_cache_key,
    module_fingerprint,
)
from engine.backends.eager import EagerRunner
from engine.backends.onnxruntime import OnnxRuntimeRunner

BASE = CacheKeyParts(network="unet", model_hash="abc123", width=512, height=512, batch=2, cfg_type="self",
                     dtype="float16", kv_cache=True, exporter="dynamo", opset=18, tensorrt_version="10.3.0",
                     gpu_name="NVIDIA GeForce RTX 4090")
CHANGED = {"network": "vae_decoder", "model_hash": "abc124", "width": 768, "height": 768, "batch": 3,
           "cfg_type": "full", "dtype": "float32", "kv_cache": False, "exporter": "torchscript", "opset": 17,
           "tensorrt_version": "10.4.0", "gpu_name": "NVIDIA A100"}


def test_every_part_of_the_key_is_covered():
    assert set(CHANGED) == {field.name for field in dataclasses.fields(CacheKeyParts)}


@pytest.mark.parametrize("part", sorted(CHANGED))
def test_key_changes_with_each_part(part):
    assert engine_cache_key(dataclasses.replace(BASE, **{part: CHANGED[part]})) != engine_cache_key(BASE)


def test_key_is_stable_for_identical_parts():
    assert engine_cache_key(BASE) == engine_cache_key(dataclasses.replace(BASE))
    assert engine_cache_key(BASE).startswith("unet-512x512-b2-self-float16-")


def test_resolution_alone_changes_the_key():
    # Upstream's key left the resolution out: a 512 engine was loaded for a 768 stream.
    assert engine_cache_key(BASE) != engine_cache_key(dataclasses.replace(BASE, width=768))
    assert engine_cache_key(BASE) != engine_cache_key(dataclasses.replace(BASE, height=768))


def test_fingerprint_follows_weights_and_config(tiny_models):
    vae = tiny_models.vae
    assert module_fingerprint(vae) == module_fingerprint(vae)
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        parameter = next(changed.parameters())
        parameter[(0,) * parameter.dim()] += 1e-3
    assert module_fingerprint(changed) != module_fingerprint(vae)
    assert module_fingerprint(tiny_models.unet) != module_fingerprint(vae)


def test_fingerprint_ignores_the_memory_format(tiny_models):
    # The eager runner stores TAESD channels_last; an exported graph of the same weights is the same graph.
    row_major = copy.deepcopy(tiny_models.vae).to(memory_format=torch.contiguous_format)
    channels_last = copy.deepcopy(row_major).to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in channels_last.parameters() if p.dim() == 4)
    assert module_fingerprint(channels_last) == module_fingerprint(row_major)


def test_fingerprint_is_the_same_in_another_process(tiny_models):
    # diffusers records defaulted config names as a set, whose order changes with the hash seed.
    script = ("from engine import load_models; from engine.backends.cache import module_fingerprint; "
              "print(module_fingerprint(load_models('tiny').unet))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONHASHSEED": "12345"}, check=True)
    assert result.stdout.strip().splitlines()[-1] == module_fingerprint(tiny_models.unet)


def test_failed_build_leaves_no_file(tmp_path):
    target = tmp_path / "graph.onnx"

    def failing_build(temporary):
        temporary.write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError, match="exporter crashed"):
        atomic_write(target, failing_build)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_companion_names(tmp_path):
    target = tmp_path / "graph.onnx"

    def build(temporary):
        temporary.write_text("graph referring to graph.onnx.data")
        temporary.with_name(temporary.name + ".data").write_text("weights")

    atomic_write(target, build)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["graph.onnx", "graph.onnx.data"]


def test_unreadable_file_is_rebuilt_once(tmp_path):
    target = tmp_path / "artifact.bin"
    target.write_bytes(b"garbage")
    builds = []

    def build(temporary):
        builds.append(temporary)
        temporary.write_bytes(b"good")

    def load(path):
        data = path.read_bytes()
        if data != b"good":
            raise ValueError("corrupt")
        return data

    assert cached_artifact(target, build, load) == b"good"
    assert cached_artifact(target, build, load) == b"good"
    assert len(builds) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_onnx_file_is_rebuilt_not_a_crash(tiny_models, tmp_path, damage):
    shape = GraphShape("vae_decoder", 1, 64, 64)
    OnnxRuntimeRunner(tiny_models, "self", tmp_path, exporter="torchscript").graph(shape)
    path = next(tmp_path.glob("vae_decoder-*.onnx"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00not an onnx graph" * 10)

    runner = OnnxRuntimeRunner(tiny_models, "self", tmp_path, exporter="torchscript")
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = EagerRunner(tiny_models).decode(latents)
    assert (runner.decode(latents) - expected).abs().max().item() < 1e-4
    assert path.stat().st_size == len(data)
