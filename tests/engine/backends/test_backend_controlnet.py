"""A ControlNet on the compiled backends: its own ONNX graph (residuals at scale 1), the UNet graph taking the
residuals as inputs, ONNX Runtime against eager (residuals and whole streams), the cache keys, `auto`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.backends import auto
from engine.backends.artifacts import GraphShape, OnnxCache, config_shapes, onnx_input_shapes
from engine.backends.auto import Measurement, calibration_candidates, calibration_key, measure_backend, resolve_auto
from engine.backends.base import RunnerCapabilities
from engine.backends.cache import engine_cache_key, module_fingerprint
from engine.backends.eager import EagerRunner
from engine.backends.factory import Availability
from engine.backends.onnx_export import control_residual_names, residual_shapes
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.backends.resolution import ResolutionRange
from engine.control.residuals import ControlResiduals
from engine.controlnet import control_embedding_channels, controlnet_body, embed_control, random_controlnet
from engine.guidance import unet_batch_size
from engine.prompt import Conditioning, precompute_kv

TOLERANCE = 1e-4
SIZE = 64
# The tiny UNet's down-block outputs (conv_in, two resnets, one downsampler) and its mid block.
RESIDUALS = ["down_residual_0", "down_residual_1", "down_residual_2", "down_residual_3", "mid_residual"]
# The worst |ONNX Runtime - eager| of each check, printed at the end of the module (`pytest -s`) for the record.
WORST: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report_worst():
    yield
    for name, value in WORST.items():
        print(f"ONNX Runtime vs eager, {name}: max abs error {value:.2e}")


pytestmark = [pytest.mark.usefixtures("keep_torch_threads"), pytest.mark.slow]


def _record(name: str, error: float) -> float:
    WORST[name] = max(WORST.get(name, 0.0), error)
    return error


def _unet_inputs(models, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(rows, 4, SIZE // 8, SIZE // 8, generator=generator)
    timesteps = torch.arange(rows, dtype=torch.long) * 150 + 99
    states = torch.randn(rows, models.tokenizer.model_max_length, models.unet.config.cross_attention_dim,
                         generator=generator)
    images = torch.rand(rows, 3, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        return latents, timesteps, states, embed_control(models.controlnet, images)


def _max_error(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_controlnet_graph_and_unet_residual_inputs_equal_eager(tiny_controlnet_engine, onnx_cache_dir, exporter,
                                                               kv_cache):
    models = tiny_controlnet_engine.models
    runner, eager = OnnxRuntimeRunner(models, "self", onnx_cache_dir, exporter), EagerRunner(models)
    rows = unet_batch_size("self", 2)
    latents, timesteps, states, embeddings = _unet_inputs(models, rows, seed=1)
    conditioning = Conditioning(states, precompute_kv(models.unet, states) if kv_cache else None)

    residuals = runner.controlnet(latents, timesteps, conditioning, embeddings)
    expected = eager.controlnet(latents, timesteps, conditioning, embeddings)
    assert [tuple(tensor.shape) for tensor in residuals.tensors()] == \
        [tuple(tensor.shape) for tensor in expected.tensors()] == residual_shapes(models.unet, rows, 8, 8)
    assert _record(f"ControlNet residuals ({exporter})", _max_error(residuals.tensors(), expected.tensors())) \
        < TOLERANCE

    shape = GraphShape("controlnet", rows, SIZE, SIZE, False, models.tokenizer.model_max_length)
    session = runner.graph(shape)
    assert session.input_names == runner.onnx_cache.input_names(shape) == \
        ["latents", "timesteps", "encoder_hidden_states", "control_embedding"]
    assert session.output_names == runner.onnx_cache.output_names(shape) == RESIDUALS

    # The UNet graph takes the residuals after its usual inputs; the same residuals give the eager UNet's output.
    controlled = dataclasses.replace(conditioning, control=expected)
    actual = runner.unet(latents, timesteps, controlled)
    assert _record(f"UNet with residuals ({exporter})",
                   (actual - eager.unet(latents, timesteps, controlled)).abs().max().item()) < TOLERANCE
    unet = runner.graph(GraphShape("unet", rows, SIZE, SIZE, kv_cache, models.tokenizer.model_max_length,
                                   control=True))
    assert unet.input_names[-5:] == RESIDUALS == control_residual_names(models.unet)
    assert unet.input_names[:2] == ["latents", "timesteps"]
    assert ("encoder_hidden_states" in unet.input_names) != kv_cache
    # No residuals (scale 0, the ControlNet not run): the same graph fed zeros, the UNet without a ControlNet.
    plain = runner.unet(latents, timesteps, conditioning)
    assert _record(f"UNet with zero residuals ({exporter})",
                   (plain - eager.unet(latents, timesteps, conditioning)).abs().max().item()) < TOLERANCE
    assert (actual - plain).abs().max().item() > 100 * TOLERANCE  # the residuals matter


def test_sdxl_controlnet_graph_takes_the_added_inputs_and_equals_eager(tiny_sdxl_models, onnx_cache_dir):
    models = dataclasses.replace(tiny_sdxl_models, controlnet=random_controlnet(tiny_sdxl_models.unet, seed=2).eval())
    runner, eager = OnnxRuntimeRunner(models, "full", onnx_cache_dir, "torchscript"), EagerRunner(models)
    rows = unet_batch_size("full", 1)
    latents, timesteps, states, embeddings = _unet_inputs(models, rows, seed=3)
    generator = torch.Generator().manual_seed(5)
    pooled = models.text_encoder_2.config.projection_dim
    added = {"text_embeds": torch.randn(rows, pooled, generator=generator),
             "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32).expand(rows, -1)}
    conditioning = Conditioning(states, precompute_kv(models.unet, states), added)
    residuals = runner.controlnet(latents, timesteps, conditioning, embeddings)
    expected = eager.controlnet(latents, timesteps, conditioning, embeddings)
    assert _record("SDXL ControlNet residuals", _max_error(residuals.tensors(), expected.tensors())) < TOLERANCE
    controlled = dataclasses.replace(conditioning, control=expected)
    assert _record("SDXL UNet with residuals", (runner.unet(latents, timesteps, controlled)
                                                - eager.unet(latents, timesteps, controlled)).abs().max().item()) \
        < TOLERANCE
    shape = GraphShape("controlnet", rows, SIZE, SIZE, False, models.tokenizer.model_max_length)
    assert runner.onnx_cache.input_names(shape)[:4] == ["latents", "timesteps", "text_embeds", "time_ids"]


# ---------------------------------------------------------------------------------------------- whole streams


@pytest.fixture(scope="module")
def onnx_controlnet_engine(tiny_controlnet_engine, tiny_controlnet_dir):
    """The eager ControlNet engine's models on ONNX Runtime."""
    return Engine.prepare(tiny_controlnet_engine.models,
                          LoadConfig(model="tiny", controlnet=str(tiny_controlnet_dir), backend="onnxruntime"))


def _frames(count: int, seed: int) -> list[torch.Tensor]:
    """Random blocks: sharp edges for canny, different in every frame."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.rand(1, 3, SIZE // 8, SIZE // 8, generator=generator) for _ in range(count)]
    return [torch.nn.functional.interpolate(block, scale_factor=8, mode="nearest")[0] for block in blocks]


def _config(cfg_type: str, **changes) -> StreamConfig:
    return StreamConfig(width=SIZE, height=SIZE, cfg_type=cfg_type, t_index_list=(32, 45), similarity_filter=False,
                        guidance_scale=1.5, delta=0.8, canny_low_threshold=50, canny_high_threshold=120,
                        negative_prompt="blurry", **changes)


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_a_controlnet_stream_on_onnxruntime_equals_eager(tiny_controlnet_engine, onnx_controlnet_engine, tiny_engine,
                                                         cfg_type):
    config = _config(cfg_type)
    eager, compiled = StreamEngine(tiny_controlnet_engine, config), StreamEngine(onnx_controlnet_engine, config)
    without = StreamEngine(tiny_engine, config)
    assert isinstance(compiled.runner, OnnxRuntimeRunner)
    frames = _frames(6, seed=11)
    for index, frame in enumerate(frames):
        if index == 3:  # a hot scale change reaches the graphs from the next frame
            for stream in (eager, compiled):
                stream.update_params(controlnet_scale=0.6)
        expected, actual = eager(frame), compiled(frame)
        assert _record(f"whole stream, cfg {cfg_type}", (actual - expected).abs().max().item()) < TOLERANCE
    # The ControlNet changes the output by far more than the tolerance: the residuals reach the compiled UNet.
    assert (expected - without(frame)).abs().max().item() > 100 * TOLERANCE
    names = sorted(path.name.split("-")[0] for path in compiled.runner.prepare(config, kv_cache=True))
    assert names == ["controlnet", "unet+residuals", "vae_decoder", "vae_encoder"]


def test_scale_zero_on_onnxruntime_is_the_stream_without_controlnet(onnx_controlnet_engine, tiny_engine, monkeypatch):
    config = _config("full", controlnet_scale=0.0)
    compiled, plain = StreamEngine(onnx_controlnet_engine, config), StreamEngine(tiny_engine, config)
    runner = compiled.runner
    calls = []
    monkeypatch.setattr(runner, "controlnet", lambda *args: calls.append(args))
    for frame in _frames(4, seed=12):
        assert _record("scale 0 vs eager without ControlNet",
                       (compiled(frame) - plain(frame)).abs().max().item()) < TOLERANCE
    assert calls == []  # at 0 the ControlNet graph is not run: the UNet graph got zeros
    zeros = [tensor for tensors in runner._zero_residuals.values() for tensor in tensors]
    assert zeros and all(torch.count_nonzero(tensor) == 0 for tensor in zeros)


# ---------------------------------------------------------------------------------------------- cache keys


def test_the_cache_keys_name_the_controlnet(tiny_controlnet_engine, tiny_models, tmp_path):
    models = tiny_controlnet_engine.models
    other = dataclasses.replace(models, controlnet=random_controlnet(models.unet, seed=6))
    cache, other_cache = OnnxCache(models, "self", tmp_path), OnnxCache(other, "self", tmp_path)
    plain_cache = OnnxCache(tiny_models, "self", tmp_path)
    config = StreamConfig(width=SIZE, height=SIZE)
    shapes = {shape.network: shape for shape in config_shapes(models, config, kv_cache=True)}
    assert set(shapes) == {"unet", "controlnet", "vae_encoder", "vae_decoder"}
    assert shapes["unet"].control and shapes["controlnet"].batch == shapes["unet"].batch
    assert {shape.network for shape in config_shapes(tiny_models, config, kv_cache=True)} == \
        {"unet", "vae_encoder", "vae_decoder"}

    # The ControlNet's graph (its body: the condition embedding runs outside) is keyed by its own config and weights:
    # two ControlNets never share one.
    parts = cache.key_parts(shapes["controlnet"])
    assert parts.model_hash == module_fingerprint(controlnet_body(models.controlnet)) \
        != module_fingerprint(controlnet_body(other.controlnet))
    assert cache.onnx_path(shapes["controlnet"]) != other_cache.onnx_path(shapes["controlnet"])
    assert cache.onnx_path(shapes["controlnet"]).name.startswith("controlnet-64x64-b2-self-float32-")
    # The UNet graph with residual inputs differs from the plain UNet's, and serves any ControlNet of its UNet.
    plain = dataclasses.replace(shapes["unet"], control=False)
    assert cache.onnx_path(shapes["unet"]) != plain_cache.onnx_path(plain)
    assert cache.onnx_path(shapes["unet"]) == other_cache.onnx_path(shapes["unet"])
    assert cache.onnx_path(shapes["unet"]).name.startswith("unet+residuals-64x64-b2-self-float32-")
    assert cache.key_parts(shapes["unet"]).control_residuals and not plain_cache.key_parts(plain).control_residuals
    # A plain graph's key is what it was before ControlNets: the new field is left out of its hash.
    assert engine_cache_key(plain_cache.key_parts(plain)) == engine_cache_key(
        dataclasses.replace(cache.key_parts(shapes["unet"]), control_residuals=False))
    # TensorRT engines add their version and GPU to the same parts.
    engine_parts = cache.key_parts(shapes["controlnet"], "10.3.0", "NVIDIA GeForce RTX 4090")
    assert engine_cache_key(engine_parts) != engine_cache_key(
        other_cache.key_parts(shapes["controlnet"], "10.3.0", "NVIDIA GeForce RTX 4090"))


def test_the_controlnet_graph_is_static_and_its_inputs_pinned(tiny_controlnet_engine, onnx_cache_dir):
    models = tiny_controlnet_engine.models
    cache = OnnxCache(models, "self", onnx_cache_dir, "torchscript")
    shape = GraphShape("controlnet", 2, SIZE, SIZE, False, 77)
    inputs = onnx_input_shapes(cache.load(shape))
    text = (2, 77, models.unet.config.cross_attention_dim)
    assert inputs == {"latents": (2, 4, 8, 8), "timesteps": (2,), "encoder_hidden_states": text,
                      "control_embedding": (2, control_embedding_channels(models.controlnet), 8, 8)}
    assert cache.output_shapes(shape) == residual_shapes(models.unet, 2, 8, 8)
    with pytest.raises(ValueError, match="outputs"):
        cache.graph_spec(shape).output_name  # noqa: B018


def test_a_resolution_range_with_a_controlnet_is_refused_clearly(tiny_controlnet_engine, tiny_controlnet_dir,
                                                                 tmp_path):
    models = tiny_controlnet_engine.models
    with pytest.raises(ValueError, match="resolution range .* does not take a ControlNet"):
        OnnxRuntimeRunner(models, "self", tmp_path, resolution_range=ResolutionRange.between(64, 128, 64))
    load = LoadConfig(model="tiny", controlnet=str(tiny_controlnet_dir),
                      resolution_range=ResolutionRange.between(64, 128, 64))
    resolved, choice = resolve_auto(models, load, _config("self"), tmp_path, measure=_never)
    assert resolved.backend == "eager" and "static" in choice.reason


# ---------------------------------------------------------------------------------------------- the engine's checks


class NoControlNetRunner:
    """A runner of a backend without ControlNet support (as `compile`'s)."""

    capabilities = RunnerCapabilities("compile")

    def __init__(self, models):
        self.models = models

    def prepare(self, config, kv_cache):
        pass


def test_a_backend_without_controlnet_support_is_refused_naming_those_with_it(tiny_controlnet_engine, with_runner):
    runner = NoControlNetRunner(tiny_controlnet_engine.models)
    with pytest.raises(ValueError, match="UNet backend \\(compile\\) cannot run one.*'onnxruntime' or 'tensorrt'"):
        StreamEngine(with_runner(tiny_controlnet_engine, runner), _config("self"))


# ---------------------------------------------------------------------------------------------- auto


def _never(*args, **kwargs):
    raise AssertionError("nothing should be measured")


CPU = Availability("cpu", "no CUDA", ("CPUExecutionProvider",))


def test_auto_measures_the_backends_that_run_a_controlnet(tiny_controlnet_engine, tiny_controlnet_dir, tiny_models,
                                                          tmp_path, monkeypatch):
    assert calibration_candidates(CPU, 600) == ("eager", "onnxruntime", "compile")
    assert calibration_candidates(CPU, 600, controlnet=True) == ("eager", "onnxruntime")
    models = tiny_controlnet_engine.models
    load = LoadConfig(model="tiny", controlnet=str(tiny_controlnet_dir), auto_compile_budget_s=600)
    monkeypatch.setattr(auto, "probe_availability", lambda device, dtype: CPU)
    measured = []

    def measure(backend, models, load, stream, cache_dir=None):
        measured.append(backend)
        return Measurement(backend, {"eager": 10.0, "onnxruntime": 20.0}[backend], 0.1)

    resolved, choice = resolve_auto(models, load, _config("self"), tmp_path, measure=measure)
    assert resolved.backend == "onnxruntime" and measured == ["eager", "onnxruntime"]
    # The key names the ControlNet (so a verdict without it is never reused), and keys without one are unchanged.
    key = calibration_key(models, load, _config("self"), threads=2)
    plain = calibration_key(tiny_models, LoadConfig(model="tiny", auto_compile_budget_s=600), _config("self"), 2)
    assert key.controlnet == module_fingerprint(models.controlnet)[:20] and plain.controlnet is None
    assert "controlnet" not in plain.fields() and key.digest() != dataclasses.replace(key, controlnet=None).digest()


class RecordingRunner:
    capabilities = RunnerCapabilities("recording", controlnet=True)

    def __init__(self):
        self.calls = []

    def prepare(self, config, kv_cache):
        pass

    def encode(self, images):
        self.calls.append("encode")
        return images

    def control_embedding(self, images):
        return images

    def controlnet(self, latents, timesteps, conditioning, embeddings):
        self.calls.append("controlnet")
        assert embeddings.shape[0] == latents.shape[0] and embeddings.shape[-2:] == latents.shape[-2:]
        return ControlResiduals((latents,), latents)

    def unet(self, latents, timesteps, conditioning):
        self.calls.append("unet" if conditioning.control is None else "unet+residuals")
        return latents

    def decode(self, latents):
        self.calls.append("decode")
        return latents


def test_the_calibration_workload_runs_the_controlnet_before_the_unet(tiny_controlnet_engine, tiny_controlnet_dir,
                                                                      monkeypatch):
    runner = RecordingRunner()
    monkeypatch.setattr(auto, "new_runner", lambda *args: runner)
    load = LoadConfig(model="tiny", controlnet=str(tiny_controlnet_dir))
    measurement = measure_backend("onnxruntime", tiny_controlnet_engine.models, load, _config("self"), rounds=1)
    assert measurement.dropped is None
    assert runner.calls[:4] == ["encode", "controlnet", "unet+residuals", "decode"]
