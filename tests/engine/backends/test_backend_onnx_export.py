"""ONNX export of the UNet (with the prompt K/V cache as inputs), the VAE encoder and the VAE decoder."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, StreamEngine
from engine.backends.artifacts import GraphShape, OnnxCache, config_shapes
from engine.backends.eager import EagerRunner
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.guidance import unet_batch_size

TOLERANCE = 1e-4
# The shape matrix runs on the TorchScript exporter, five times faster to export here; the default
# (dynamo) exporter runs the whole engine in test_backend_onnxruntime.py.
MATRIX_EXPORTER = "torchscript"


def _conditioning(models, cfg_type: str, size: int):
    engine = StreamEngine(models, EngineConfig(width=size, height=size, cfg_type=cfg_type))
    return engine._prompt.layouts[(cfg_type, engine.config.denoising_steps)]


def _static_shapes(session) -> list[list]:
    return [graph_input.shape for graph_input in session.session.get_inputs()]


@pytest.mark.parametrize("size", [64, 96])
@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_unet_export_takes_cached_kv_and_matches_eager(tiny_models, onnx_cache_dir, size, cfg_type):
    runner = OnnxRuntimeRunner(tiny_models, cfg_type, onnx_cache_dir, MATRIX_EXPORTER)
    conditioning = _conditioning(tiny_models, cfg_type, size)
    batch = unet_batch_size(cfg_type, 2)
    shape = GraphShape("unet", batch, size, size, True, tiny_models.tokenizer.model_max_length)
    session = runner.graph(shape)

    names = session.input_names
    assert names[:2] == ["latents", "timesteps"]
    assert len(names) == 2 + 2 * len(conditioning.kv_cache)
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
    config = EngineConfig(width=96, height=64, t_index_list=(10, 20, 30), cfg_type="initialize", frame_buffer_size=2)
    shapes = {shape.network: shape for shape in config_shapes(tiny_models, config)}
    assert shapes["unet"].batch == (3 + 1) * 2
    assert (shapes["unet"].width, shapes["unet"].height) == (96, 64)
    assert shapes["vae_encoder"].batch == shapes["vae_decoder"].batch == 2
    sequential = config_shapes(tiny_models, config.replace(stream_batch=False))
    assert sorted(shape.batch for shape in sequential if shape.network == "unet") == [2, 4]


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
