"""ONNX export of the UNet (with the prompt K/V cache as inputs), the VAE encoder and the VAE decoder."""

from __future__ import annotations

import copy

import pytest
import torch

from engine import StreamConfig, StreamEngine
from engine.backends import onnx_export
from engine.backends.artifacts import GraphShape, OnnxCache, check_onnx_file, config_shapes, onnx_input_shapes
from engine.backends.cache import CorruptArtifactError
from engine.backends.eager import EagerRunner
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.guidance import unet_batch_size

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
# The shape matrix runs on the TorchScript exporter, five times faster to export here; the default
# (dynamo) exporter runs the whole engine in test_backend_onnxruntime.py.
MATRIX_EXPORTER = "torchscript"


def _conditioning(engine, cfg_type: str, size: int):
    engine = StreamEngine(engine, StreamConfig(width=size, height=size, cfg_type=cfg_type))
    return engine._prompt.layouts[(cfg_type, engine.config.denoising_steps)]


def _static_shapes(session) -> list[list]:
    return [graph_input.shape for graph_input in session.session.get_inputs()]


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_unet_export_takes_cached_kv_and_matches_eager(tiny_models, tiny_engine, onnx_cache_dir, size, cfg_type):
    runner = OnnxRuntimeRunner(tiny_models, cfg_type, onnx_cache_dir, MATRIX_EXPORTER)
    conditioning = _conditioning(tiny_engine, cfg_type, size)
    batch = unet_batch_size(cfg_type, 2)
    shape = GraphShape("unet", batch, size, size, True, tiny_models.tokenizer.model_max_length)
    session = runner.graph(shape)

    names = session.input_names
    assert names[:2] == ["latents", "timesteps"]
    assert len(names) == 2 + 2 * len(conditioning.kv_cache)
    # The names the TensorRT backend binds by are exactly the exported graph's, in its order.
    assert names == runner.onnx_cache.input_names(shape)
    assert "encoder_hidden_states" not in names
    shapes = _static_shapes(session)
    assert shapes[0] == [batch, 4, size // 8, size // 8]
    assert all(isinstance(dim, int) for input_shape in shapes for dim in input_shape)

    generator = torch.Generator().manual_seed(size)
    latents = torch.randn(batch, 4, size // 8, size // 8, generator=generator)
    timesteps = torch.arange(batch, dtype=torch.long) * 200 + 99
    expected = EagerRunner(tiny_models).unet(latents, timesteps, conditioning)
    actual = runner.unet(latents, timesteps, conditioning)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("size", [64, 96])
def test_vae_export_matches_eager(tiny_models, onnx_cache_dir, size):
    runner = OnnxRuntimeRunner(tiny_models, "self", onnx_cache_dir, MATRIX_EXPORTER)
    eager = EagerRunner(tiny_models)
    images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    latents = runner.encode(images)
    assert latents.shape == (1, 4, size // 8, size // 8)
    assert (latents - eager.encode(images)).abs().max().item() < TOLERANCE
    decoded = runner.decode(latents)
    assert decoded.shape == (1, 3, size, size)
    assert (decoded - eager.decode(latents)).abs().max().item() < TOLERANCE
    for network in ("vae_encoder", "vae_decoder"):
        session = runner.graph(GraphShape(network, 1, size, size))
        assert all(isinstance(dim, int) for input_shape in _static_shapes(session) for dim in input_shape)


def test_graph_shapes_follow_guidance_mode_and_frame_buffer(tiny_models):
    config = StreamConfig(width=96, height=64, t_index_list=(10, 20, 30), cfg_type="initialize", frame_buffer_size=2)
    shapes = {shape.network: shape for shape in config_shapes(tiny_models, config, kv_cache=True)}
    assert shapes["unet"].batch == (3 + 1) * 2
    assert (shapes["unet"].width, shapes["unet"].height) == (96, 64)
    assert shapes["vae_encoder"].batch == shapes["vae_decoder"].batch == 2
    sequential = config_shapes(tiny_models, config.replace(stream_batch=False), kv_cache=True)
    assert sorted(shape.batch for shape in sequential if shape.network == "unet") == [2, 4]
    # The K/V mode is the engine's (a load-time setting): the UNet graphs take K/V inputs only with the cache.
    assert shapes["unet"].kv_cache and shapes["unet"].sequence_length == tiny_models.tokenizer.model_max_length
    uncached = {shape.network: shape for shape in config_shapes(tiny_models, config, kv_cache=False)}
    assert not uncached["unet"].kv_cache and uncached["unet"].batch == shapes["unet"].batch


def test_onnx_paths_differ_by_resolution_batch_and_mode(tiny_models, tmp_path):
    cache = OnnxCache(tiny_models, "self", tmp_path)
    base = GraphShape("unet", 2, 64, 64, True, 77)
    paths = {
        cache.onnx_path(base),
        cache.onnx_path(GraphShape("unet", 2, 96, 64, True, 77)),
        cache.onnx_path(GraphShape("unet", 3, 64, 64, True, 77)),
        cache.onnx_path(GraphShape("unet", 2, 64, 64, False, 77)),
        OnnxCache(tiny_models, "none", tmp_path).onnx_path(base),
    }
    assert len(paths) == 5
    assert cache.onnx_path(base) == OnnxCache(tiny_models, "self", tmp_path).onnx_path(base)


@pytest.mark.parametrize("network, kv_cache", [("unet", True), ("unet", False), ("vae_encoder", False),
                                               ("vae_decoder", False)])
def test_input_names_are_the_exported_specs(tiny_models, tmp_path, network, kv_cache):
    cache = OnnxCache(tiny_models, "self", tmp_path)
    shape = GraphShape(network, 2, 64, 64, kv_cache, 77 if network == "unet" else 0)
    spec = cache.graph_spec(shape)
    assert list(spec.inputs) == cache.input_names(shape)
    assert spec.output_name == cache.output_name(shape)


def _exported_decoder(tmp_path, models, **kwargs):
    spec = onnx_export.vae_decoder_graph(models, 1, 8, 8)
    path = tmp_path / "vae_decoder-test.onnx"
    onnx_export.export_onnx(spec, path, "torchscript", **kwargs)
    return path


def test_small_graphs_are_saved_as_one_file(tiny_models, tmp_path):
    path = _exported_decoder(tmp_path, tiny_models)
    assert [item.name for item in tmp_path.iterdir()] == [path.name]
    assert check_onnx_file(path) == path


def test_large_graphs_keep_all_weights_in_one_file_named_after_the_graph(tiny_models, tmp_path):
    # max_inline_bytes=0 forces what a >2 GiB graph gets: every weight in one `<name>.data` beside it,
    # none of the exporter's per-tensor files left behind.
    path = _exported_decoder(tmp_path, tiny_models, max_inline_bytes=0)
    assert sorted(item.name for item in tmp_path.iterdir()) == [path.name, path.name + ".data"]
    assert path.stat().st_size < (tmp_path / (path.name + ".data")).stat().st_size
    assert check_onnx_file(path) == path


def test_graphs_with_the_same_tensor_names_keep_their_own_weights(tiny_models, tmp_path, monkeypatch):
    # Two model sets whose weights have the same names: per-tensor files named after the tensors
    # overwrote each other in one folder; one file per graph, named after its key, cannot.
    monkeypatch.setattr(onnx_export, "MAX_INLINE_BYTES", 0)
    changed = copy.deepcopy(tiny_models)
    with torch.no_grad():
        for parameter in changed.vae.parameters():
            parameter.mul_(1.5)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    runners = [OnnxRuntimeRunner(models, "self", tmp_path, MATRIX_EXPORTER) for models in (tiny_models, changed)]
    outputs = [runner.decode(latents) for runner in runners]
    for models, output in zip((tiny_models, changed), outputs, strict=True):
        assert (output - EagerRunner(models).decode(latents)).abs().max().item() < TOLERANCE
    assert (outputs[0] - outputs[1]).abs().max().item() > 10 * TOLERANCE
    data_files = sorted(item.name for item in tmp_path.glob("*.data"))
    assert len(data_files) == 2 and all(name.startswith("vae_decoder-") for name in data_files)


def test_onnx_files_are_checked_by_path_without_loading_their_weights(tiny_models, tmp_path, monkeypatch):
    import onnx

    path = _exported_decoder(tmp_path, tiny_models, max_inline_bytes=0)
    # A graph over 2 GiB cannot be checked as a ModelProto (the checker refuses it): pretend this one
    # is that large; checking by path does not go through a ModelProto at all.
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 16)
    loads = []
    real_load = onnx.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("load_external_data", True))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(onnx, "load", recording_load)
    assert check_onnx_file(path) == path
    assert not any(loads)


@pytest.mark.parametrize("damage", ["truncate_weights", "delete_weights", "garbage", "truncate_graph"])
def test_damaged_onnx_files_are_reported_corrupt(tiny_models, tmp_path, damage):
    path = _exported_decoder(tmp_path, tiny_models, max_inline_bytes=0)
    data = path.with_name(path.name + ".data")
    if damage == "truncate_weights":
        data.write_bytes(data.read_bytes()[:100])
    elif damage == "delete_weights":
        data.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x00not an onnx graph" * 10)
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptArtifactError):
        check_onnx_file(path)


def test_onnx_input_shapes_read_the_static_graph(tiny_models, onnx_cache_dir):
    cache = OnnxCache(tiny_models, "self", onnx_cache_dir, MATRIX_EXPORTER)
    shape = GraphShape("unet", 2, 64, 64, True, 77)
    shapes = onnx_input_shapes(cache.load(shape))
    assert list(shapes) == cache.input_names(shape)
    assert shapes["latents"] == (2, 4, 8, 8)
    assert shapes["timesteps"] == (2,)
    assert all(len(dims) == 4 and dims[0] == 2 and dims[2] == 77 for name, dims in shapes.items() if ".key" in name)
