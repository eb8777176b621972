"""The engine cache: keys that change with each part, atomic writes, corrupt files rebuilt, good files kept."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from engine import StreamConfig
from engine.backends.artifacts import GraphShape, OnnxCache
from engine.backends.cache import (
    CacheKeyParts,
    CorruptArtifactError,
    atomic_write,
    cached_artifact,
    digest_path,
    engine_cache_key,
    gpu_name,
    key_parts_path,
    module_fingerprint,
    read_key_parts,
    tensorrt_version,
    unloadable_file_error,
    write_digest,
    write_key_parts,
)
from engine.backends.eager import EagerRunner
from engine.backends.errors import BackendUnavailableError
from engine.backends.onnxruntime import OnnxRuntimeRunner

pytestmark = pytest.mark.slow

BASE = CacheKeyParts(network="unet", model_hash="abc123", width=512, height=512, batch=2, cfg_type="self",
                     dtype="float16", kv_cache=True, exporter="dynamo", opset=18, tensorrt_version="10.3.0",
                     gpu_name="NVIDIA GeForce RTX 4090", sequence_length=77)
CHANGED = {"network": "vae_decoder", "model_hash": "abc124", "width": 768, "height": 768, "batch": 3,
           "cfg_type": "full", "dtype": "float32", "kv_cache": False, "exporter": "torchscript", "opset": 17,
           "tensorrt_version": "10.4.0", "gpu_name": "NVIDIA A100", "sequence_length": 64,
           "resolution_range": (256, 512, 1024), "loras": ("latent-consistency/lcm-lora-sdv1-5:1",),
           "control_residuals": True, "attention_bank": 2}


def test_every_part_of_the_key_is_covered():
    assert set(CHANGED) == {field.name for field in dataclasses.fields(CacheKeyParts)}


@pytest.mark.parametrize("part", sorted(CHANGED))
def test_key_changes_with_each_part(part):
    assert engine_cache_key(dataclasses.replace(BASE, **{part: CHANGED[part]})) != engine_cache_key(BASE)


def test_key_is_stable_for_identical_parts():
    assert engine_cache_key(BASE) == engine_cache_key(dataclasses.replace(BASE))
    assert engine_cache_key(BASE).startswith("unet-512x512-b2-self-float16-")


def test_static_keys_did_not_change_when_resolution_ranges_came():
    # The key of BASE before `resolution_range` was a field: caches built then are still found.
    assert engine_cache_key(BASE) == "unet-512x512-b2-self-float16-e178009373be7839cd59"


def test_key_parts_with_loras_round_trip_through_their_record(tmp_path):
    parts = dataclasses.replace(BASE, loras=("owner/style:0.5", "./other.safetensors:1"))
    path = tmp_path / f"{engine_cache_key(parts)}.onnx"
    write_key_parts(path, parts)
    assert read_key_parts(path) == parts


def test_a_unet_graph_with_controlnet_residual_inputs_is_named_as_such(tmp_path):
    parts = dataclasses.replace(BASE, control_residuals=True)
    assert engine_cache_key(parts).startswith("unet+residuals-512x512-b2-self-float16-")
    path = tmp_path / f"{engine_cache_key(parts)}.onnx"
    write_key_parts(path, parts)
    assert read_key_parts(path) == parts


def test_a_unet_graph_with_an_attention_bank_is_named_by_its_size(tmp_path):
    parts = dataclasses.replace(BASE, attention_bank=3)
    assert engine_cache_key(parts).startswith("unet+bank3-512x512-b2-self-float16-")
    assert engine_cache_key(dataclasses.replace(parts, attention_bank=2)) != engine_cache_key(parts)
    path = tmp_path / f"{engine_cache_key(parts)}.onnx"
    write_key_parts(path, parts)
    assert read_key_parts(path) == parts


def test_a_dynamic_graphs_key_holds_its_range():
    dynamic = dataclasses.replace(BASE, resolution_range=(256, 512, 1024))
    assert engine_cache_key(dynamic).startswith("unet-256to1024-b2-self-float16-")
    for other in ((256, 512, 768), (256, 768, 1024)):
        assert engine_cache_key(dynamic) != engine_cache_key(dataclasses.replace(dynamic, resolution_range=other))


def test_resolution_alone_changes_the_key():
    # Upstream's key left the resolution out: a 512 engine was loaded for a 768 stream.
    assert engine_cache_key(BASE) != engine_cache_key(dataclasses.replace(BASE, width=768))
    assert engine_cache_key(BASE) != engine_cache_key(dataclasses.replace(BASE, height=768))


def test_graph_key_holds_the_text_length_and_the_models_dtype(tiny_models, tmp_path):
    # The K/V inputs' shape is fixed by the text length: a 64-token graph must not serve 77 tokens.
    onnx_cache = OnnxCache(tiny_models, "self", tmp_path)
    long, short = GraphShape("unet", 2, 64, 64, True, 77), GraphShape("unet", 2, 64, 64, True, 64)
    assert onnx_cache.key_parts(long).sequence_length == 77
    assert onnx_cache.onnx_path(long) != onnx_cache.onnx_path(short)
    # The precision is the models' own; an engine of float32 models is a float32 engine.
    assert onnx_cache.key_parts(long, "10.3.0", "GPU").dtype == "float32"
    half = copy.deepcopy(tiny_models).to(torch.device("cpu"), torch.float16)
    assert OnnxCache(half, "self", tmp_path).key_parts(long, "10.3.0", "GPU").dtype == "float16"


def test_gpu_name_is_the_models_gpu_not_the_current_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"GPU {index}")
    assert gpu_name(torch.device("cuda", 1)) == "GPU 1"
    assert gpu_name(torch.device("cuda")) == "GPU 0"
    assert gpu_name(torch.device("cpu")) == "cpu"


def test_tensorrt_version_survives_a_broken_install(tmp_path, monkeypatch):
    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text("raise OSError('libnvinfer.so.10: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    assert tensorrt_version() == "none"


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


def _strict_load(path):
    data = path.read_bytes()
    if data != b"good":
        raise CorruptArtifactError("corrupt")
    return data


def test_unreadable_file_is_rebuilt_once(tmp_path):
    target = tmp_path / "artifact.bin"
    target.write_bytes(b"garbage")
    builds = []

    def build(temporary):
        builds.append(temporary)
        temporary.write_bytes(b"good")

    assert cached_artifact(target, build, _strict_load) == b"good"
    assert cached_artifact(target, build, _strict_load) == b"good"
    assert len(builds) == 1


def test_rebuilding_a_corrupt_file_removes_its_companions_only(tmp_path):
    target = tmp_path / "graph.onnx"
    target.write_bytes(b"garbage")
    (tmp_path / "graph.onnx.data").write_bytes(b"old weights")
    (tmp_path / "graph.onnx.sha256").write_text("0" * 64)
    (tmp_path / "other.onnx.data").write_bytes(b"another graph's weights")

    def build(temporary):
        temporary.write_bytes(b"good")

    assert cached_artifact(target, build, _strict_load) == b"good"
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != ".locks") == ["graph.onnx",
                                                                                        "other.onnx.data"]


@pytest.mark.parametrize("error", [MemoryError("CUDA out of memory"),
                                   RuntimeError("could not create an execution context"),
                                   BackendUnavailableError("bfloat16 buffers are not supported here")])
def test_a_load_error_that_is_not_corruption_keeps_the_file_and_propagates(tmp_path, error):
    # Deleting a good engine for an out-of-memory error costs minutes of rebuilding and fails again.
    target = tmp_path / "unet.engine"
    target.write_bytes(b"a good engine")
    identity = _identity(target)
    builds = []

    def load(path):
        raise error

    with pytest.raises(type(error)):
        cached_artifact(target, builds.append, load)
    assert builds == []
    assert _identity(target) == identity


def test_an_unloadable_file_is_corrupt_unless_it_matches_its_digest(tmp_path):
    target = tmp_path / "unet.engine"
    target.write_bytes(b"a serialized engine")
    assert isinstance(unloadable_file_error(target, "deserialize failed"), CorruptArtifactError)
    write_digest(target)
    assert digest_path(target).name == "unet.engine.sha256"
    kept = unloadable_file_error(target, "deserialize failed")
    assert not isinstance(kept, CorruptArtifactError) and "intact" in str(kept)
    target.write_bytes(b"a serialized engi")
    assert isinstance(unloadable_file_error(target, "deserialize failed"), CorruptArtifactError)


def test_cached_engine_that_fails_to_deserialize_is_rebuilt_only_when_damaged(tmp_path):
    target = tmp_path / "unet.engine"
    builds = []

    def build(temporary):
        builds.append(temporary)
        temporary.write_bytes(b"engine")
        write_digest(temporary, b"engine")

    def failing_deserialize(path):
        # What an out-of-memory deserialisation looks like: TensorRT returns None for a good file.
        raise unloadable_file_error(path, "deserialize_cuda_engine returned None")

    def load(path):
        return path.read_bytes()

    cached_artifact(target, build, load)
    with pytest.raises(RuntimeError, match="intact"):
        cached_artifact(target, build, failing_deserialize)
    assert len(builds) == 1 and target.read_bytes() == b"engine"
    target.write_bytes(b"eng")
    with pytest.raises(RuntimeError, match="intact"):
        # Rebuilt (the damaged file did not match its digest), and the fresh engine fails the same way.
        cached_artifact(target, build, failing_deserialize)
    assert len(builds) == 2 and target.read_bytes() == b"engine"


def _identity(path):
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def test_file_identity_detects_a_rewrite(tmp_path):
    # The check the "no rebuild" tests rely on: an atomic rewrite changes the inode even within one mtime tick.
    target = tmp_path / "graph.onnx"
    atomic_write(target, lambda temporary: temporary.write_bytes(b"graph"))
    before = _identity(target)
    atomic_write(target, lambda temporary: temporary.write_bytes(b"graph"))
    assert _identity(target) != before


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


def test_onnxruntime_session_error_keeps_a_good_graph(tiny_models, tmp_path, monkeypatch):
    shape = GraphShape("vae_decoder", 1, 64, 64)
    OnnxRuntimeRunner(tiny_models, "self", tmp_path, exporter="torchscript").graph(shape)
    path = next(tmp_path.glob("vae_decoder-*.onnx"))
    identity = _identity(path)
    runner = OnnxRuntimeRunner(tiny_models, "self", tmp_path, exporter="torchscript")

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("Failed to allocate memory for requested buffer")

    monkeypatch.setattr(runner._ort, "InferenceSession", out_of_memory)
    with pytest.raises(RuntimeError, match="allocate memory"):
        runner.graph(shape)
    assert _identity(path) == identity


def test_reopening_cached_graphs_rebuilds_nothing(tiny_models, tmp_path):
    config = StreamConfig(width=64, height=64, cfg_type="none")
    paths = OnnxRuntimeRunner(tiny_models, "none", tmp_path, exporter="torchscript").prepare(config, kv_cache=True)
    # Recorded before the second runner opens them: a rebuild replaces each file (a new inode).
    before = {path: _identity(path) for path in paths}
    reopened = OnnxRuntimeRunner(tiny_models, "none", tmp_path, exporter="torchscript").prepare(config, kv_cache=True)
    assert reopened == paths
    assert {path: _identity(path) for path in paths} == before


def test_a_built_artifact_records_its_key_parts_beside_it(tmp_path):
    target = tmp_path / f"{engine_cache_key(BASE)}.engine"
    cached_artifact(target, lambda temporary: temporary.write_bytes(b"engine"), _strict_load_engine, BASE)
    assert key_parts_path(target).name == target.name + ".json"
    assert read_key_parts(target) == BASE
    assert engine_cache_key(read_key_parts(target)) == target.name.removesuffix(".engine")


def test_a_file_cached_before_key_parts_were_recorded_gets_them_when_it_loads(tmp_path):
    target = tmp_path / "old.engine"
    target.write_bytes(b"engine")
    builds = []
    cached_artifact(target, builds.append, _strict_load_engine, BASE)
    assert builds == [] and read_key_parts(target) == BASE


def test_a_corrupt_file_loses_its_key_parts_with_it(tmp_path):
    target = tmp_path / "graph.engine"
    target.write_bytes(b"garbage")
    key_parts_path(target).write_text("{}")
    cached_artifact(target, lambda temporary: temporary.write_bytes(b"engine"), _strict_load_engine, BASE)
    assert read_key_parts(target) == BASE


@pytest.mark.parametrize("text", ["not json", '{"network": "unet"}', '{"unknown_field": 1}', "[]"])
def test_unreadable_key_parts_are_a_value_error(tmp_path, text):
    target = tmp_path / "graph.onnx"
    key_parts_path(target).write_text(text)
    with pytest.raises(ValueError, match="does not hold cache key parts"):
        read_key_parts(target)
    with pytest.raises(FileNotFoundError):
        read_key_parts(tmp_path / "other.onnx")


def _strict_load_engine(path):
    if path.read_bytes() != b"engine":
        raise CorruptArtifactError("corrupt")
    return path


def _race_build(path: str, counter: str, barrier) -> str:
    """One of two processes that want the same artifact at the same moment (two replicas on one cache)."""
    import time as clock
    from pathlib import Path as P

    from engine.backends.cache import cached_artifact

    def build(temporary: P) -> None:
        with open(counter, "a") as handle:
            handle.write("built\n")
        clock.sleep(0.5)  # long enough for the other process to arrive while this one builds
        temporary.write_text(f"artifact of {P(path).name}")

    barrier.wait()
    return cached_artifact(P(path), build, lambda loaded: loaded.read_text())


def test_two_processes_building_the_same_artifact_build_it_once(tmp_path):
    """Issue 28 item 3: without a lock both built and renamed over each other; with it the second waits and
    loads what the first built."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier = context.Manager().Barrier(2)
    path, counter = tmp_path / "unet.engine", tmp_path / "builds.txt"
    with context.Pool(2) as pool:
        results = pool.starmap(_race_build, [(str(path), str(counter), barrier)] * 2, chunksize=1)
    assert results == ["artifact of unet.engine"] * 2
    assert counter.read_text().splitlines() == ["built"]
    assert sorted(item.name for item in tmp_path.iterdir()) == [".locks", "builds.txt", "unet.engine"]
