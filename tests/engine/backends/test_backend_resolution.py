"""Resolution ranges: one dynamic-shape ONNX graph per network serves every size of a range, equal to eager."""

from __future__ import annotations

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.backends import make_runner
from engine.backends.artifacts import GraphShape, OnnxCache, onnx_input_shapes
from engine.backends.cache import read_key_parts
from engine.backends.eager import EagerRunner
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.backends.resolution import ResolutionRange, check_range, dynamic_axis_ranges, size_multiple
from engine.backends.tensorrt import profile_shapes
from engine.build import main as build_main
from engine.config import parse_resolution_range
from engine.flags import configs_from
from engine.guidance import unet_batch_size

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
# The tiny model's sizes are multiples of 16 (VAE factor 8, one UNet upsampler): 32-128, opt 64.
TINY_RANGE = ResolutionRange.between(32, 128, 64)
# Two sizes of the range, one of them not square, neither the export's sample size.
SIZES = [(96, 96), (48, 112)]


# ---------------------------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("text, expected", [
    ("256-1024", (256, 512, 1024)),
    ("256-1024:768", (256, 768, 1024)),
    (" 640 - 1024 ", (640, 640, 1024)),
    ("64-128", (64, 128, 128)),
])
def test_ranges_parse_with_opt_512_clamped_into_them(text, expected):
    assert parse_resolution_range(text).key() == expected


@pytest.mark.parametrize("text, match", [
    ("1024-256", "min <= opt <= max"),
    ("256-1024:2048", "min <= opt <= max"),
    ("250-1024", "multiples of 8"),
    ("256", "MIN-MAX"),
    ("256x1024", "MIN-MAX"),
])
def test_bad_ranges_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        parse_resolution_range(text)


def test_range_text_round_trips():
    for text in ("256-1024", "256-1024:768"):
        assert str(parse_resolution_range(text)) == text


def test_the_size_multiple_is_the_vae_factor_times_the_unets_upsampling(tiny_models):
    # Stable Diffusion: 8 * 2**3 = 64; the tiny model's UNet upsamples once.
    assert size_multiple(tiny_models) == 16
    assert check_range(TINY_RANGE, 16) is TINY_RANGE
    with pytest.raises(ValueError, match="multiple of 64 .* e.g. 320-960"):
        check_range(ResolutionRange.between(264, 1000, 512), 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        OnnxRuntimeRunner(tiny_models, resolution_range=ResolutionRange.between(40, 128, 64))


def test_covers_needs_both_sides_inside_and_on_the_multiple():
    sd = parse_resolution_range("256-1024")
    assert sd.covers(512, 768, 64) and sd.covers(256, 1024, 64)
    assert not sd.covers(512, 1088, 64) and not sd.covers(192, 512, 64) and not sd.covers(520, 512, 64)


def test_axis_ranges_are_in_each_graphs_input_units():
    sd = parse_resolution_range("256-1024")
    assert dynamic_axis_ranges("unet", sd, 8) == {"height": (32, 64, 128), "width": (32, 64, 128)}
    assert dynamic_axis_ranges("vae_decoder", sd, 8) == dynamic_axis_ranges("unet", sd, 8)
    assert dynamic_axis_ranges("vae_encoder", sd, 8) == {"height": (256, 512, 1024), "width": (256, 512, 1024)}


def test_a_dynamic_graphs_key_parts_hold_the_range(tiny_models, tmp_path):
    cache = OnnxCache(tiny_models, "self", tmp_path)
    static = GraphShape("unet", 2, 64, 64, True, 77)
    dynamic = static.in_range(TINY_RANGE)
    parts = cache.key_parts(dynamic)
    assert parts.resolution_range == (32, 64, 128) and (parts.width, parts.height) == (64, 64)
    assert cache.key_parts(static).resolution_range is None
    assert cache.onnx_path(dynamic) != cache.onnx_path(static)
    assert cache.onnx_path(dynamic).name.startswith("unet-32to128-b2-self-float32-")


# ---------------------------------------------------------------------------------------------- ONNX Runtime


@pytest.fixture(scope="module")
def dynamic_runner(tiny_models, tmp_path_factory):
    """An ONNX Runtime runner on dynamic-shape graphs from the default (dynamo) exporter."""
    return OnnxRuntimeRunner(tiny_models, "self", tmp_path_factory.mktemp("dynamic"), resolution_range=TINY_RANGE)


def _onnx_files(runner):
    return sorted(path.name for path in runner.onnx_cache.cache_dir.glob("*.onnx"))


def _conditioning(engine: Engine, batch_steps: int):
    stream = StreamEngine(engine, StreamConfig(width=64, height=64, cfg_type="self",
                                               t_index_list=tuple(range(10, 10 + 10 * batch_steps, 10))))
    return stream._prompt.layouts[("self", batch_steps)]


def test_one_dynamic_unet_graph_with_kv_inputs_serves_two_sizes_as_eager(tiny_models, tiny_engine, dynamic_runner):
    conditioning = _conditioning(tiny_engine, 2)
    batch = unet_batch_size("self", 2)
    eager = EagerRunner(tiny_models)
    for index, (height, width) in enumerate(SIZES):
        generator = torch.Generator().manual_seed(index)
        latents = torch.randn(batch, 4, height // 8, width // 8, generator=generator)
        timesteps = torch.tensor([699, 299])
        expected = eager.unet(latents, timesteps, conditioning)
        actual = dynamic_runner.unet(latents, timesteps, conditioning)
        assert actual.shape == expected.shape == latents.shape
        assert (actual - expected).abs().max().item() < TOLERANCE
    unet_files = [name for name in _onnx_files(dynamic_runner) if name.startswith("unet-")]
    assert len(unet_files) == 1 and unet_files[0].startswith("unet-32to128-")
    shape = GraphShape("unet", batch, 96, 96, True, tiny_models.tokenizer.model_max_length)
    shapes = onnx_input_shapes(dynamic_runner.artifact_path(dynamic_runner.graph_shape(shape)))
    assert shapes["latents"] == (batch, 4, "height", "width")
    # Only the spatial axes are dynamic: the K/V inputs and the timesteps keep their static shapes.
    assert all(isinstance(dim, int) for name, dims in shapes.items() if name != "latents" for dim in dims)


def test_one_dynamic_vae_encoder_and_decoder_serve_two_sizes_as_eager(tiny_models, dynamic_runner):
    eager = EagerRunner(tiny_models)
    for index, (height, width) in enumerate(SIZES):
        images = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(index)) * 2 - 1
        latents = dynamic_runner.encode(images)
        assert latents.shape == (1, 4, height // 8, width // 8)
        assert (latents - eager.encode(images)).abs().max().item() < TOLERANCE
        decoded = dynamic_runner.decode(latents)
        assert decoded.shape == images.shape
        assert (decoded - eager.decode(latents)).abs().max().item() < TOLERANCE
    for network in ("vae_encoder", "vae_decoder"):
        assert len([name for name in _onnx_files(dynamic_runner) if name.startswith(f"{network}-32to128-")]) == 1
    encoder = dynamic_runner.artifact_path(dynamic_runner.graph_shape(GraphShape("vae_encoder", 1, 96, 96)))
    assert onnx_input_shapes(encoder)["images"] == (1, 3, "height", "width")
    assert read_key_parts(encoder).resolution_range == TINY_RANGE.key()


def test_a_size_outside_the_range_gets_a_static_graph(tiny_models, dynamic_runner):
    images = torch.rand(1, 3, 144, 144, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert (dynamic_runner.encode(images) - EagerRunner(tiny_models).encode(images)).abs().max().item() < TOLERANCE
    assert dynamic_runner.graph_shape(GraphShape("vae_encoder", 1, 144, 144)).resolution_range is None
    assert any(name.startswith("vae_encoder-144x144-") for name in _onnx_files(dynamic_runner))


def _frames(count: int, height: int, width: int) -> list[torch.Tensor]:
    return [torch.from_numpy(frame).permute(2, 0, 1).float() / 255
            for frame in synthetic_clip("slow_pan", count, width, height, seed=3)]


def test_a_stream_changes_resolution_inside_the_range_without_a_new_graph(tiny_engine, tmp_path):
    config = StreamConfig(width=64, height=64, cfg_type="self", similarity_filter=False)
    runner = OnnxRuntimeRunner(tiny_engine.models, "self", tmp_path, "torchscript", resolution_range=TINY_RANGE)
    compiled = StreamEngine(tiny_engine.with_runner(runner), config)
    eager = StreamEngine(tiny_engine, config)
    files = _onnx_files(runner)
    assert len(files) == 3 and all("-32to128-" in name for name in files)
    for height, width in [(64, 64), *SIZES]:
        for engine in (compiled, eager):
            engine.update_params(width=width, height=height)
        for frame in _frames(3, height, width):
            expected, actual = eager(frame), compiled(frame)
            assert actual.shape == (3, height, width)
            assert (actual - expected).abs().max().item() < TOLERANCE
    assert _onnx_files(runner) == files


def test_make_runner_takes_the_range_from_the_load_config(tiny_models, tmp_path):
    """`--resolution-range` (server, `engine.build`; env `STREAMDIFF_RESOLUTION_RANGE` on the server) is a
    load-time setting: it reaches the runner through `LoadConfig`."""
    load, stream, _ = configs_from({"backend": "onnxruntime", "device": "cpu",
                                    "resolution_range": parse_resolution_range(str(TINY_RANGE))})
    assert load.resolution_range == TINY_RANGE
    assert LoadConfig(resolution_range="32-128:64").resolution_range == TINY_RANGE
    runner = make_runner(tiny_models, load, None, tmp_path, "torchscript")
    assert runner.resolution_range == TINY_RANGE
    static = make_runner(tiny_models, load.replace(resolution_range=None), None, tmp_path, "torchscript")
    assert static is not runner and static.resolution_range is None


def test_build_cli_prebuilds_dynamic_graphs(tmp_path, capsys):
    argv = ["--model", "tiny", "--width", "64", "--height", "64", "--cfg-type", "none", "--backend", "onnxruntime",
            "--exporter", "torchscript", "--cache-dir", str(tmp_path), "--resolution-range", "32-128:64"]
    assert build_main(argv) == 0
    assert "onnxruntime: 3 graphs ready" in capsys.readouterr().out
    assert sorted(path.name.split("-b")[0] for path in tmp_path.glob("*.onnx")) == [
        "unet-32to128", "vae_decoder-32to128", "vae_encoder-32to128"]
    assert build_main([*argv[:-1], "40-128"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- TensorRT profile


def test_the_tensorrt_profile_of_a_dynamic_graph_spans_the_range(tiny_models, dynamic_runner):
    # What `TensorRTRunner._build` hands the builder, from the same dynamic ONNX file ONNX Runtime runs.
    batch = unet_batch_size("self", 2)
    shape = dynamic_runner.graph_shape(GraphShape("unet", batch, 64, 64, True, tiny_models.tokenizer.model_max_length))
    path = dynamic_runner.artifact_path(shape)
    profile = profile_shapes(onnx_input_shapes(path), dynamic_axis_ranges("unet", TINY_RANGE, 8))
    assert profile["latents"] == ((batch, 4, 4, 4), (batch, 4, 8, 8), (batch, 4, 16, 16))
    assert profile["timesteps"] == ((batch,),) * 3
    encoder = dynamic_runner.artifact_path(dynamic_runner.graph_shape(GraphShape("vae_encoder", 1, 64, 64)))
    profile = profile_shapes(onnx_input_shapes(encoder), dynamic_axis_ranges("vae_encoder", TINY_RANGE, 8))
    assert profile["images"] == ((1, 3, 32, 32), (1, 3, 64, 64), (1, 3, 128, 128))
