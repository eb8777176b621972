"""TensorRT: a clear error where it cannot run; every decision that needs no GPU (version probe,
builder arguments, profile shapes, I/O binding, replay check, cache lookup order, the ControlNet's engines and
their keys) on CPU; build, load and run where CUDA and tensorrt exist."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import time

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine, load_models
from engine.backends import BackendUnavailableError, make_runner, resolve_backend
from engine.backends import tensorrt as trt_backend
from engine.backends.artifacts import GraphShape
from engine.backends.cache import engine_cache_key, evict_least_recently_used, mark_used, write_digest
from engine.backends.onnx_export import control_residual_names, residual_shapes
from engine.backends.progress import heartbeat
from engine.backends.resolution import ResolutionRange
from engine.backends.static import StaticShapeRunner
from engine.backends.tensorrt import (
    TensorIO,
    TensorRTRunner,
    bind_inputs,
    builder_arguments,
    check_engine_io,
    cuda_device,
    dims_match,
    profile_shapes,
    replay_matches,
    tensorrt_unavailable_reason,
    torch_dtype,
    version_unavailable_reason,
)
from engine.build import main as build_main
from engine.controlnet import control_embedding_channels, random_controlnet

UNAVAILABLE = tensorrt_unavailable_reason()
needs_tensorrt = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"TensorRT cannot run here: {UNAVAILABLE}")


@pytest.mark.skipif(UNAVAILABLE is None, reason="CUDA and TensorRT are present: the backend runs")
def test_tensorrt_without_cuda_or_package_fails_clearly(tiny_models):
    load, config = LoadConfig(model="tiny", backend="tensorrt"), StreamConfig(width=64, height=64)
    with pytest.raises(BackendUnavailableError, match="tensorrt backend needs") as error:
        make_runner(tiny_models, load, config)
    assert "onnxruntime" in str(error.value)
    # The backend is a load-time setting: loading the engine is what fails, before any stream opens.
    with pytest.raises(BackendUnavailableError, match="tensorrt backend needs"):
        Engine.prepare(tiny_models, load)
    with pytest.raises(BackendUnavailableError):
        TensorRTRunner(tiny_models)


@pytest.mark.skipif(UNAVAILABLE is None, reason="CUDA and TensorRT are present: the backend runs")
def test_build_cli_reports_tensorrt_unavailable(tmp_path, capsys):
    code = build_main(["--width", "64", "--height", "64", "--backend", "tensorrt", "--cache-dir", str(tmp_path)])
    assert code == 2
    assert "tensorrt backend needs" in capsys.readouterr().err


def _frames(count: int, height: int = 64, width: int = 64) -> list[torch.Tensor]:
    return [torch.from_numpy(frame).permute(2, 0, 1).float() / 255
            for frame in synthetic_clip("slow_pan", count, width, height, seed=3)]


CUDA_LOAD = LoadConfig(model="tiny", device="cuda", dtype="float16")


@pytest.fixture(scope="module")
def cuda_models():
    return load_models("tiny").to(torch.device("cuda"), torch.float16)


@pytest.fixture(scope="module")
def cuda_engine(cuda_models):
    return Engine.prepare(cuda_models, CUDA_LOAD)


@pytest.mark.cuda
@needs_tensorrt
def test_tensorrt_engine_builds_loads_and_follows_eager(cuda_models, cuda_engine, with_runner, tmp_path):
    config = StreamConfig(width=64, height=64, similarity_filter=False)
    runner = TensorRTRunner(cuda_models, config.cfg_type, tmp_path)
    paths = runner.prepare(config, CUDA_LOAD.kv_cache)
    assert all(path.suffix == ".engine" and path.is_file() for path in paths)
    assert (tmp_path / runner.timing_cache.name).is_file()
    eager = StreamEngine(cuda_engine, config)
    compiled = StreamEngine(with_runner(cuda_engine, runner), config)
    for frame in _frames(5):
        expected, actual = eager(frame), compiled(frame)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        # fp16 engines against fp16 PyTorch: close, not bit-equal.
        assert (actual.float() - expected.float()).abs().max().item() < 5e-2


@pytest.mark.cuda
@needs_tensorrt
def test_tensorrt_buffers_are_allocated_once_and_engines_are_not_rebuilt(cuda_models, cuda_engine, with_runner,
                                                                        tmp_path):
    config = StreamConfig(width=64, height=64, similarity_filter=False)
    runner = TensorRTRunner(cuda_models, config.cfg_type, tmp_path)
    paths = runner.prepare(config, CUDA_LOAD.kv_cache)
    engine = StreamEngine(with_runner(cuda_engine, runner), config)
    engine(_frames(1)[0])
    graphs = list(runner._graphs.values())
    addresses = [{name: buffer.data_ptr() for name, buffer in graph.buffers.items()} for graph in graphs]
    for frame in _frames(3):
        engine(frame)
    assert [{name: buffer.data_ptr() for name, buffer in graph.buffers.items()} for graph in graphs] == addresses
    # Recorded before the reload opens the files: a rebuild writes a new file (new inode, new mtime).
    before = {path: _identity(path) for path in paths}
    assert TensorRTRunner(cuda_models, config.cfg_type, tmp_path).prepare(config, CUDA_LOAD.kv_cache) == paths
    assert {path: _identity(path) for path in paths} == before


@pytest.mark.cuda
@needs_tensorrt
def test_tensorrt_engines_follow_the_models_dtype_and_capture_at_prepare(tmp_path):
    models = load_models("tiny").to(torch.device("cuda"), torch.float32)
    config = StreamConfig(width=64, height=64, similarity_filter=False)
    runner = TensorRTRunner(models, config.cfg_type, tmp_path)
    paths = runner.prepare(config, kv_cache=True)
    assert all("-float32-" in path.name for path in paths)
    for graph in runner._graphs.values():
        assert {tensor.dtype for tensor in graph.io if tensor.dtype.is_floating_point} == {torch.float32}
        assert graph.uses_cuda_graph


@pytest.mark.cuda
@needs_tensorrt
def test_tensorrt_controlnet_engines_follow_eager(cuda_models, tmp_path):
    """The ControlNet's engine and the UNet's with residual inputs, against the eager ControlNet stream (fp16)."""
    models = dataclasses.replace(cuda_models, controlnet=random_controlnet(cuda_models.unet, seed=5))
    models.to(torch.device("cuda"), torch.float16)
    load = LoadConfig(model="tiny", controlnet="random", device="cuda", dtype="float16", backend="eager")
    eager_engine = Engine.prepare(models, load)
    config = StreamConfig(width=64, height=64, similarity_filter=False, t_index_list=(32, 45), cfg_type="full")
    runner = TensorRTRunner(models, config.cfg_type, tmp_path)
    paths = runner.prepare(config, load.kv_cache)
    assert sorted(path.name.split("-")[0] for path in paths) == ["controlnet", "unet+residuals", "vae_decoder",
                                                                 "vae_encoder"]
    eager, compiled = StreamEngine(eager_engine, config), StreamEngine(eager_engine.with_runner(runner), config)
    frames = _frames(5)
    for index, frame in enumerate(frames):
        if index == 3:  # scale 0: the UNet engine gets zero residuals
            for engine in (eager, compiled):
                engine.update_params(controlnet_scale=0.0)
        expected, actual = eager(frame), compiled(frame)
        assert (actual.float() - expected.float()).abs().max().item() < 5e-2


@pytest.mark.cuda
@needs_tensorrt
def test_tensorrt_bank_engine_follows_the_eager_bank(cuda_models, cuda_engine, tmp_path):
    """`temporal="bank"` on TensorRT: the UNet engine with the attention bank's inputs and outputs (fp16)."""
    config = StreamConfig(width=64, height=64, similarity_filter=False, temporal="bank").updated(
        temporal_bank_size=2, temporal_injection_threshold=0.5, temporal_injection_strength=0.6)
    runner = TensorRTRunner(cuda_models, config.cfg_type, tmp_path)
    eager, compiled = StreamEngine(cuda_engine, config), StreamEngine(cuda_engine.with_runner(runner), config)
    for index, frame in enumerate(_frames(7)):
        if index == 5:
            for stream in (eager, compiled):
                stream.reset()
        expected, actual = eager(frame), compiled(frame)
        assert (actual.float() - expected.float()).abs().max().item() < 5e-2


@pytest.mark.cuda
@needs_tensorrt
def test_one_dynamic_tensorrt_engine_serves_two_sizes_of_its_range(cuda_models, cuda_engine, tmp_path):
    config = StreamConfig(width=64, height=64, similarity_filter=False)
    resolution_range = ResolutionRange.between(32, 128, 64)
    runner = TensorRTRunner(cuda_models, config.cfg_type, tmp_path, resolution_range=resolution_range)
    paths = runner.prepare(config, CUDA_LOAD.kv_cache)
    assert all("-32to128-" in path.name for path in paths)
    eager, compiled = StreamEngine(cuda_engine, config), StreamEngine(cuda_engine.with_runner(runner), config)
    for height, width in [(64, 64), (96, 48)]:
        for engine in (eager, compiled):
            engine.update_params(width=width, height=height)
        for frame in _frames(3, height, width):
            expected, actual = eager(frame), compiled(frame)
            assert actual.shape == expected.shape == (3, height, width)
            assert (actual.float() - expected.float()).abs().max().item() < 5e-2
    assert sorted(tmp_path.glob("*.engine")) == sorted(paths)


def _identity(path):
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


# ---------------------------------------------------------------------------------------------- availability


def _fake_package(folder, name, source):
    package = folder / name
    package.mkdir()
    (package / "__init__.py").write_text(source)


@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """A machine where torch sees CUDA, with fake `tensorrt`/`polygraphy` packages written into `tmp_path`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.syspath_prepend(str(tmp_path))
    saved = {name: sys.modules.pop(name) for name in ("tensorrt", "polygraphy") if name in sys.modules}
    yield tmp_path
    # The fakes must not outlive the test (pytest's delitem restores nothing for an absent key).
    for name in ("tensorrt", "polygraphy"):
        sys.modules.pop(name, None)
    sys.modules.update(saved)


@pytest.mark.parametrize("source, error", [
    ("raise OSError('libnvinfer.so.10: cannot open shared object file')", "OSError"),
    ("import sys\nsys.modules[__name__].missing_symbol", "AttributeError"),
])
def test_a_broken_tensorrt_install_is_a_reason_not_a_crash(fake_cuda, tiny_models, caplog, source, error):
    _fake_package(fake_cuda, "tensorrt", source + "\n")
    reason = tensorrt_unavailable_reason()
    assert reason is not None and error in reason and "reinstall" in reason
    with caplog.at_level(logging.INFO, logger="engine.backends.factory"):
        assert resolve_backend("auto", tiny_models) in ("onnxruntime", "eager")
    assert error in caplog.text


def test_a_missing_polygraphy_is_a_reason(fake_cuda, monkeypatch):
    _fake_package(fake_cuda, "tensorrt", "__version__ = '10.3.0'\n")
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    assert "polygraphy" in tensorrt_unavailable_reason()


def test_working_tensorrt_and_polygraphy_have_no_reason(fake_cuda):
    _fake_package(fake_cuda, "tensorrt", "__version__ = '11.4.0.106'\n")
    _fake_package(fake_cuda, "polygraphy", "__version__ = '0.53.6'\n")
    assert tensorrt_unavailable_reason() is None


@pytest.mark.parametrize("tensorrt_version, polygraphy_version, needle", [
    ("10.0.1", "0.49.0", None),
    ("10.16.1.11", "0.49.26", None),
    ("11.4.0.106", "0.53.6", None),
    ("11.0.0.114", "0.50.3", None),
    ("11.4.0.106", "0.49.26", "polygraphy 0.50.3+"),
    ("9.0.1.post11.dev4", "0.47.1", "TensorRT 10+"),
    ("", "0.53.6", "cannot read"),
])
def test_version_reasons(tensorrt_version, polygraphy_version, needle):
    reason = version_unavailable_reason(tensorrt_version, polygraphy_version)
    assert reason is None if needle is None else needle in reason


# ---------------------------------------------------------------------------------------------- build


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_builder_arguments_are_strongly_typed_with_no_precision_flag(dtype, tmp_path):
    # TensorRT 11 removed BuilderFlag.FP16 (polygraphy's fp16=True raises there) and strongly typed
    # networks refuse precision flags on 10: the graph's own dtype is the engine's precision.
    arguments = builder_arguments(dtype, {"latents": (2, 4, 8, 8), "timesteps": (2,)}, 1 << 30,
                                  tmp_path / "timing.cache")
    assert arguments.network == {"strongly_typed": True}
    assert not {"fp16", "bf16", "int8", "fp8", "precision_constraints"} & set(arguments.config)
    assert arguments.config["tf32"] is False
    assert arguments.config["memory_pool_limits"] == {"WORKSPACE": 1 << 30}
    assert arguments.config["load_timing_cache"] == str(tmp_path / "timing.cache")
    assert arguments.profile["latents"] == ((2, 4, 8, 8),) * 3
    assert builder_arguments(dtype, {}, timing_cache=None).config["load_timing_cache"] is None


@pytest.mark.parametrize("dtype", ["float64", "int8", "float8_e4m3fn"])
def test_builder_arguments_refuse_other_dtypes(dtype):
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        builder_arguments(dtype, {})


def test_polygraphy_accepts_the_builder_arguments(tmp_path):
    pytest.importorskip("polygraphy", reason="polygraphy is not installed (pip install '.[trt]')")
    from polygraphy.backend.trt import CreateConfig, NetworkFromOnnxPath, Profile

    arguments = builder_arguments("float16", {"latents": (2, 4, 8, 8)})
    network = NetworkFromOnnxPath(str(tmp_path / "graph.onnx"), **arguments.network)
    config = CreateConfig(profiles=[Profile().add("latents", *arguments.profile["latents"])], **arguments.config)
    assert network.strongly_typed is True
    assert config.fp16 is False and config.bf16 is False and config.tf32 is False


def test_static_profiles_pin_every_dimension():
    shapes = {"latents": (2, 4, 8, 8), "timesteps": (2,), "attn.key": (2, 8, 77, 8)}
    profile = profile_shapes(shapes)
    assert profile == {name: (dims, dims, dims) for name, dims in shapes.items()}


def test_dynamic_dimensions_take_their_range():
    # How a dynamic-resolution graph (height/width named in the ONNX) slots in: one range per name.
    profile = profile_shapes({"latents": (2, 4, "height", "width"), "timesteps": (2,)},
                             {"height": (32, 64, 128), "width": (32, 96, 128)})
    assert profile["latents"] == ((2, 4, 32, 32), (2, 4, 64, 96), (2, 4, 128, 128))
    assert profile["timesteps"] == ((2,), (2,), (2,))


@pytest.mark.parametrize("shapes, ranges, match", [
    ({"latents": (2, 4, "height", 8)}, None, "axis 2 is dynamic"),
    ({"latents": (2, 4, "", 8)}, None, "axis 2 is dynamic"),
    ({"latents": (2, 4, "height", 8)}, {"height": (64, 32, 128)}, "min <= opt <= max"),
])
def test_bad_profiles_are_refused(shapes, ranges, match):
    with pytest.raises(ValueError, match=match):
        profile_shapes(shapes, ranges)


# ---------------------------------------------------------------------------------------------- I/O

KV = (2, 8, 77, 8)
NAMES = ["latents", "timesteps", "a.key", "a.value", "b.key", "b.value"]
# An engine that lists its I/O in another order than the graph's, with every K/V of one shape.
ENGINE_IO = [
    TensorIO("b.value", KV, torch.float16, True),
    TensorIO("eps", (2, 4, 8, 8), torch.float16, False),
    TensorIO("a.key", KV, torch.float16, True),
    TensorIO("timesteps", (2,), torch.int64, True),
    TensorIO("b.key", KV, torch.float16, True),
    TensorIO("latents", (2, 4, 8, 8), torch.float16, True),
    TensorIO("a.value", KV, torch.float16, True),
]


def _inputs():
    tensors = [torch.zeros(2, 4, 8, 8, dtype=torch.float16), torch.zeros(2, dtype=torch.long)]
    return tensors + [torch.full(KV, float(index), dtype=torch.float16) for index in range(4)]


def test_inputs_are_bound_by_name_not_position():
    bound = bind_inputs(ENGINE_IO, NAMES, _inputs())
    assert set(bound) == set(NAMES)
    for index, name in enumerate(["a.key", "a.value", "b.key", "b.value"]):
        assert bound[name].unique().item() == index
    assert bound["timesteps"].dtype == torch.int64


@pytest.mark.parametrize("change, match", [
    (lambda tensors: tensors.__setitem__(3, torch.zeros(2, 8, 64, 8, dtype=torch.float16)), "'a.value' has shape"),
    (lambda tensors: tensors.__setitem__(0, torch.zeros(2, 4, 8, 8)), "'latents' is torch.float32"),
    (lambda tensors: tensors.pop(), "expected 6 input tensors"),
])
def test_binding_refuses_a_wrong_shape_dtype_or_count(change, match):
    tensors = _inputs()
    change(tensors)
    with pytest.raises(ValueError, match=match):
        bind_inputs(ENGINE_IO, NAMES, tensors)


def test_binding_refuses_names_the_engine_does_not_have():
    with pytest.raises(ValueError, match="no input 'c.key'"):
        bind_inputs(ENGINE_IO, [*NAMES[:-1], "c.key"], _inputs())


def test_a_multi_output_engine_must_have_every_output():
    # The ControlNet's engine: one output per residual.
    io = [TensorIO("latents", (2, 4, 8, 8), torch.float16, True),
          TensorIO("mid_residual", (2, 64, 4, 4), torch.float16, False),
          TensorIO("down_residual_0", (2, 32, 8, 8), torch.float16, False)]
    assert check_engine_io(io, ["latents"], ["down_residual_0", "mid_residual"]).name == "down_residual_0"
    with pytest.raises(ValueError, match="no output 'down_residual_1'"):
        check_engine_io(io, ["latents"], ["down_residual_0", "down_residual_1", "mid_residual"])


def test_engine_io_must_be_the_graphs():
    assert check_engine_io(ENGINE_IO, NAMES, "eps").shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"missing \['c.key'\], unexpected \['b.value'\]"):
        check_engine_io(ENGINE_IO, [*NAMES[:-1], "c.key"], "eps")
    with pytest.raises(ValueError, match="no output 'images'"):
        check_engine_io(ENGINE_IO, NAMES, "images")
    dynamic = [TensorIO("latents", (-1, 4, 8, 8), torch.float16, True), ENGINE_IO[1]]
    with pytest.raises(ValueError, match="dynamic shapes, but its graph is static"):
        check_engine_io(dynamic, ["latents"], "eps")


def test_a_dynamic_engine_takes_any_size_on_its_dynamic_axes_only():
    # A dynamic-resolution engine reports -1 for height and width; TensorRT checks the profile itself.
    dynamic_io = [TensorIO("latents", (2, 4, -1, -1), torch.float16, True),
                  TensorIO("eps", (2, 4, -1, -1), torch.float16, False)]
    assert check_engine_io(dynamic_io, ["latents"], "eps", dynamic=True).name == "eps"
    for size in ((2, 4, 32, 32), (2, 4, 64, 96)):
        assert bind_inputs(dynamic_io, ["latents"], [torch.zeros(size, dtype=torch.float16)])["latents"].shape == size
    with pytest.raises(ValueError, match="has shape"):
        bind_inputs(dynamic_io, ["latents"], [torch.zeros(3, 4, 32, 32, dtype=torch.float16)])
    assert dims_match((2, 4, 8, 8), (2, 4, -1, -1)) and not dims_match((2, 4, 8), (2, 4, -1, -1))


def test_tensorrt_types_map_to_buffer_types():
    assert torch_dtype("HALF") is torch.float16
    assert torch_dtype("BF16") is torch.bfloat16
    assert torch_dtype("INT64") is torch.int64
    with pytest.raises(ValueError, match="FP8"):
        torch_dtype("FP8")


def test_replay_check_accepts_a_reproduction_and_refuses_a_broken_graph():
    reference = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    assert replay_matches(reference, reference.clone())
    assert replay_matches(reference, reference + 1e-4)
    poisoned = torch.full_like(reference, float("nan"))
    assert not replay_matches(reference, poisoned)
    partly = reference.clone()
    partly[0] = float("nan")
    assert not replay_matches(reference, partly)
    assert not replay_matches(reference, reference.flip(0))
    assert not replay_matches(reference, reference.float())
    assert not replay_matches(reference, reference[:1])
    counts = torch.arange(6)
    assert replay_matches(counts, counts.clone()) and not replay_matches(counts, counts + 1)


def test_cuda_device_names_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert cuda_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert cuda_device(torch.device("cuda", 0)) == torch.device("cuda", 0)


def test_heartbeat_logs_while_work_runs(caplog):
    log = logging.getLogger("engine.backends.test_heartbeat")
    with caplog.at_level(logging.INFO, logger=log.name):
        with heartbeat(log, "building unet.engine", interval_s=0.01):
            import time

            time.sleep(0.1)
        count = len(caplog.records)
        time.sleep(0.05)
    assert count >= 2 and "building unet.engine: still running after" in caplog.records[0].getMessage()
    assert len(caplog.records) == count


# ---------------------------------------------------------------------------------------------- runner


class _FakeEngine:
    def __init__(self, path, device, input_names, output_name, use_cuda_graph, dynamic=False):
        self.path, self.input_names, self.dynamic = path, input_names, dynamic
        self.output_names = [output_name] if isinstance(output_name, str) else list(output_name)
        self.output_name = self.output_names[0]


@pytest.fixture
def cpu_runner(tiny_models, tmp_path, monkeypatch):
    """A TensorRTRunner's lookup and build logic on CPU: the GPU parts (engine, builder, device) faked."""
    return _cpu_runner(tiny_models, tmp_path, monkeypatch)


def _cpu_runner(models, tmp_path, monkeypatch):
    runner = TensorRTRunner.__new__(TensorRTRunner)
    StaticShapeRunner.__init__(runner, models, "self", tmp_path, "torchscript")
    runner.dtype, runner.device = "float32", torch.device("cpu")
    runner.workspace_bytes, runner.use_cuda_graph = 1 << 30, True
    runner.tensorrt_version, runner.gpu_name = "10.3.0", "NVIDIA GeForce RTX 4090"
    runner.timing_cache = tmp_path / trt_backend.timing_cache_name(runner.gpu_name, runner.tensorrt_version)
    runner.cache_max_bytes = None
    monkeypatch.setattr(trt_backend, "TensorRTEngine", _FakeEngine)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    builds = []

    def fake_build(onnx_path, engine_path, arguments, timing_cache):
        builds.append((onnx_path, arguments))
        engine_path.write_bytes(b"engine")
        write_digest(engine_path, b"engine")

    monkeypatch.setattr(trt_backend, "build_engine", fake_build)
    runner.builds = builds
    return runner


def test_a_cached_engine_is_opened_without_touching_onnx(cpu_runner, tmp_path):
    shape = GraphShape("vae_decoder", 1, 64, 64)
    engine_path = cpu_runner.artifact_path(shape)
    engine_path.write_bytes(b"engine")
    engine = cpu_runner.graph(shape)
    assert engine.path == engine_path and engine.output_name == "images"
    assert cpu_runner.builds == [] and not list(tmp_path.glob("*.onnx"))


def test_a_missing_engine_is_built_from_the_checked_onnx_in_the_models_dtype(cpu_runner, tmp_path):
    shape = GraphShape("unet", 2, 64, 64, True, 77)
    engine = cpu_runner.graph(shape)
    (onnx_path, arguments), = cpu_runner.builds
    assert onnx_path.suffix == ".onnx" and onnx_path.is_file()
    assert arguments.network == {"strongly_typed": True}
    assert arguments.profile["latents"] == ((2, 4, 8, 8),) * 3
    assert list(arguments.profile) == engine.input_names == cpu_runner.onnx_cache.input_names(shape)
    name = cpu_runner.artifact_path(shape).name
    assert name.startswith("unet-64x64-b2-self-float32-") and name.endswith(".engine")
    assert (tmp_path / (name + ".sha256")).is_file()


def test_engine_key_names_the_gpu_tensorrt_and_text_length(cpu_runner):
    shape = GraphShape("unet", 2, 64, 64, True, 77)
    path = cpu_runner.artifact_path(shape)
    assert path != cpu_runner.artifact_path(GraphShape("unet", 2, 64, 64, True, 64))
    cpu_runner.gpu_name = "NVIDIA A100"
    assert cpu_runner.artifact_path(shape) != path
    cpu_runner.gpu_name, cpu_runner.tensorrt_version = "NVIDIA GeForce RTX 4090", "10.4.0"
    assert cpu_runner.artifact_path(shape) != path


def test_a_resolution_range_builds_one_engine_whose_profile_spans_it(cpu_runner):
    cpu_runner.resolution_range = ResolutionRange.between(32, 128, 64)
    paths = {cpu_runner.artifact_path(cpu_runner.graph_shape(GraphShape("unet", 2, size, size, True, 77)))
             for size in (32, 64, 96, 128)}
    assert len(paths) == 1 and next(iter(paths)).name.startswith("unet-32to128-b2-self-float32-")
    engine = cpu_runner.graph(GraphShape("unet", 2, 96, 96, True, 77))
    assert cpu_runner.graph(GraphShape("unet", 2, 48, 112, True, 77)) is engine and engine.dynamic
    (onnx_path, arguments), = cpu_runner.builds
    assert "-32to128-" in onnx_path.name
    # Latents 4..16 (32..128 pixels over the VAE's factor 8), optimised for 8 (64 pixels); the batch stays fixed.
    assert arguments.profile["latents"] == ((2, 4, 4, 4), (2, 4, 8, 8), (2, 4, 16, 16))
    assert arguments.profile["timesteps"] == ((2,),) * 3
    parts = cpu_runner.engine_key_parts(cpu_runner.graph_shape(GraphShape("unet", 2, 64, 64, True, 77)))
    assert parts.resolution_range == (32, 64, 128) and parts.gpu_name == "NVIDIA GeForce RTX 4090"
    # Outside the range: a static engine of that size.
    outside = cpu_runner.graph(GraphShape("vae_decoder", 1, 144, 144))
    assert not outside.dynamic and cpu_runner.builds[-1][1].profile["latents"] == ((1, 4, 18, 18),) * 3


def test_controlnet_engines_are_built_from_its_graphs_and_keyed_by_it(tiny_controlnet_engine, tmp_path, monkeypatch):
    """With a ControlNet: its engine (inputs and residual outputs bound by the graph's names) and the UNet's with
    residual inputs; the ControlNet's engine key follows its weights, the UNet's does not."""
    models = tiny_controlnet_engine.models
    runner = _cpu_runner(models, tmp_path, monkeypatch)
    config = StreamConfig(width=64, height=64, t_index_list=(32, 45))
    paths = runner.prepare(config, kv_cache=True)
    assert sorted(path.name.split("-")[0] for path in paths) == ["controlnet", "unet+residuals", "vae_decoder",
                                                                 "vae_encoder"]
    builds = {onnx_path.name.split("-")[0]: arguments for onnx_path, arguments in runner.builds}
    residuals = control_residual_names(models.unet)
    shapes = residual_shapes(models.unet, 2, 8, 8)
    controlnet = runner.graph(GraphShape("controlnet", 2, 64, 64, False, 77))
    assert controlnet.input_names == list(builds["controlnet"].profile) == \
        ["latents", "timesteps", "encoder_hidden_states", "control_embedding"]
    assert controlnet.output_names == residuals
    embedding = (2, control_embedding_channels(models.controlnet), 8, 8)
    assert builds["controlnet"].profile["control_embedding"] == (embedding,) * 3
    unet = runner.graph(GraphShape("unet", 2, 64, 64, True, 77, control=True))
    assert unet.input_names == list(builds["unet+residuals"].profile)
    assert unet.input_names[-len(residuals):] == residuals
    assert [builds["unet+residuals"].profile[name][0] for name in residuals] == shapes
    # Another ControlNet: another ControlNet engine, the same UNet engine.
    other = _cpu_runner(dataclasses.replace(models, controlnet=random_controlnet(models.unet, seed=9)), tmp_path,
                        monkeypatch)
    for network, same in (("controlnet", False), ("unet", True)):
        shape = GraphShape(network, 2, 64, 64, network == "unet", 77, control=network == "unet")
        assert (runner.artifact_path(shape) == other.artifact_path(shape)) is same
        assert engine_cache_key(runner.engine_key_parts(shape)).startswith(
            "controlnet-" if network == "controlnet" else "unet+residuals-")
    # Without a ControlNet, the plain UNet engine.
    plain = runner.artifact_path(GraphShape("unet", 2, 64, 64, True, 77))
    assert plain.name.startswith("unet-") and plain != runner.artifact_path(
        GraphShape("unet", 2, 64, 64, True, 77, control=True))


def test_a_bank_engine_binds_the_bank_by_name(cpu_runner):
    """The UNet engine of a `temporal="bank"` stream: built from the bank graph, every bank input in its profile
    at capacity, each layer's tensors of the call among its outputs, keyed by the bank's size."""
    config = StreamConfig(width=64, height=64, temporal="bank").updated(temporal_bank_size=3)
    paths = cpu_runner.prepare(config, kv_cache=True)
    assert sorted(path.name.split("-")[0] for path in paths) == ["unet+bank3", "vae_decoder", "vae_encoder"]
    shape = GraphShape("unet", 2, 64, 64, True, 77, bank_size=3)
    engine = cpu_runner.graph(shape)
    (onnx_path, arguments), = [build for build in cpu_runner.builds if build[0].name.startswith("unet")]
    assert engine.input_names == list(arguments.profile) == cpu_runner.onnx_cache.input_names(shape)
    assert engine.output_names == cpu_runner.onnx_cache.output_names(shape)
    assert arguments.profile["bank_mask"] == ((3,),) * 3
    layer = next(name for name in engine.input_names if name.endswith(".bank_key"))
    assert arguments.profile[layer][0][2] % 3 == 0  # capacity·tokens
    assert cpu_runner.engine_key_parts(shape).attention_bank == 3


class _RecordingContext:
    """A TensorRT execution context that records what it is given and refuses what it is told to."""

    def __init__(self, refuse_shape: str | None = None, refuse_address: str | None = None):
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.refuse_shape, self.refuse_address = refuse_shape, refuse_address

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return name != self.refuse_shape

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return name != self.refuse_address


def test_unaligned_inputs_are_bound_through_an_aligned_scratch_buffer():
    """The decoder of a resolution-range engine gets `x0[-f:]`: 64 mod 256 bytes off for the tiny model at 96x48."""
    latents = trt_backend.aligned_empty((2, 4, 6, 12), torch.float16, torch.device("cpu"))
    latents.copy_(torch.randn(2, 4, 6, 12))
    x0 = latents[-1:]  # the decoder's rows at 96x48 in fp16: 4 * 6 * 12 * 2 = 576 bytes in, 64 mod 256
    assert x0.data_ptr() % trt_backend.TENSOR_ALIGNMENT == 64
    aligned = trt_backend.aligned_empty((2, 8), torch.float32, torch.device("cpu"))
    aligned.copy_(torch.arange(16.0).view(2, 8))
    context, scratch = _RecordingContext(), {}
    bound = trt_backend.bind_dynamic(context, {"latent": x0, "other": aligned}, scratch, "decoder.engine")
    assert all(address % trt_backend.TENSOR_ALIGNMENT == 0 for address in context.addresses.values())
    assert torch.equal(bound["latent"], x0) and bound["latent"].data_ptr() == scratch["latent"].data_ptr()
    assert bound["other"].data_ptr() == aligned.data_ptr() and "other" not in scratch  # aligned: bound as it is
    assert context.shapes == {"latent": (1, 4, 6, 12), "other": (2, 8)}
    latents.mul_(2)
    again = trt_backend.bind_dynamic(context, {"latent": latents[-1:], "other": aligned}, scratch, "decoder.engine")
    assert again["latent"].data_ptr() == bound["latent"].data_ptr()  # the scratch buffer is kept per shape
    assert torch.equal(again["latent"], latents[-1:])


@pytest.mark.parametrize(("context", "match"), [
    (_RecordingContext(refuse_shape="latent"), "refused shape .* outside the engine's resolution range"),
    (_RecordingContext(refuse_address="latent"), "refused the address of 'latent'"),
])
def test_every_refused_shape_or_address_is_raised(context, match):
    with pytest.raises(RuntimeError, match=match):
        trt_backend.bind_dynamic(context, {"latent": torch.zeros(1, 4, 8, 8)}, {}, "decoder.engine")


def test_an_unaligned_output_is_never_bound():
    with pytest.raises(ValueError, match="256-byte aligned"):
        trt_backend.set_address(_RecordingContext(), "image", torch.zeros(64)[16:], "decoder.engine")
    for shape in [(1,), (3, 5), (2, 4, 6, 12)]:
        assert trt_backend.aligned_empty(shape, torch.float16, torch.device("cpu")).data_ptr() % 256 == 0


def test_a_static_engine_copies_an_input_only_when_it_changed():
    """A prompt's K/V are the same tensors every frame: copied into the engine's buffers once per prompt."""
    copied = trt_backend.CopiedInputs()
    kv, latents = torch.randn(2, 8), torch.randn(1, 4)
    assert copied.stale("k0", kv)
    copied.mark("k0", kv)
    assert not copied.stale("k0", kv)  # the next frame, same prompt: no copy
    assert copied.stale("k0", kv.clone())  # equal values, another tensor (another stream's prompt): copied
    assert copied.stale("latents", latents)
    kv.mul_(2)  # written in place since: copied again
    assert copied.stale("k0", kv)
    copied.mark("k0", kv)
    del kv  # a freed tensor never matches a new one, even at the same address
    assert copied.stale("k0", torch.randn(2, 8))
    with torch.inference_mode():
        untracked = torch.randn(2, 8)  # keeps no version counter: always copied
    copied.mark("k1", untracked)
    assert copied.stale("k1", untracked)


def _aged(path, data: bytes, age_s: float):
    path.write_bytes(data)
    (path.parent / f"{path.name}.sha256").write_text("0" * 64)
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_the_engine_cache_stays_under_its_bound_least_recently_used_first(tmp_path):
    oldest = _aged(tmp_path / "a.engine", b"x" * 1000, age_s=300)
    middle = _aged(tmp_path / "b.engine", b"x" * 1000, age_s=200)
    newest = _aged(tmp_path / "c.engine", b"x" * 1000, age_s=100)
    other = _aged(tmp_path / "graph.onnx", b"x" * 5000, age_s=999)  # not an engine: never evicted here
    removed = evict_least_recently_used(tmp_path, max_bytes=2200, keep={oldest})
    assert removed == [middle]  # the oldest is open now: kept; the next oldest goes
    assert not (tmp_path / "b.engine.sha256").exists() and oldest.exists() and newest.exists() and other.exists()
    assert evict_least_recently_used(tmp_path, max_bytes=10_000, keep=set()) == []
    mark_used(oldest)  # opened again: now the most recent
    assert evict_least_recently_used(tmp_path, max_bytes=1100, keep=set()) == [newest]


def test_opening_an_engine_evicts_old_ones_past_the_bound(cpu_runner, tmp_path):
    """`--trt-cache-max-gb`: engines were never evicted, so every size and batch a server met stayed on disk."""
    stale = _aged(tmp_path / "stale.engine", b"x" * 100_000, age_s=3600)
    cpu_runner.cache_max_bytes = 50_000
    cpu_runner.graph(GraphShape("vae_decoder", 1, 8, 8))  # builds and opens one small engine
    assert not stale.exists()
    assert len(list(tmp_path.glob("*.engine"))) == 1
