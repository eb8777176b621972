"""`temporal="bank"` on the compiled backends: the UNet graph with an attention bank of fixed capacity (banked
keys, values and attention outputs padded to capacity, empty slots masked with −inf) against the eager UNet's bank,
which concatenates only the banked frames."""

from __future__ import annotations

import pytest
import torch

from benchmarks.clips import tensor_clip
from engine import StreamConfig, StreamEngine
from engine.backends.artifacts import GraphShape, OnnxCache
from engine.backends.cache import engine_cache_key
from engine.backends.onnx_export import (
    ADDED_COND_INPUTS,
    BANK_INPUTS,
    _unet_samples,
    bank_input_names,
    bank_layer_shapes,
    graph_output_names,
    self_attention_layers,
)
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.config import ResolutionRange, TemporalSettings
from engine.prompt import install_kv_processors
from engine.temporal import AttentionBank

pytestmark = pytest.mark.slow

SIZE = 32
TOLERANCE = 1e-4


def bank_config(cfg_type: str = "self", **temporal) -> StreamConfig:
    return StreamConfig(width=SIZE, height=SIZE, similarity_filter=False, cfg_type=cfg_type,
                        temporal="bank").updated(**{f"temporal_{name}": value for name, value in temporal.items()})


def banked(stream: StreamEngine) -> list[tuple[torch.Tensor, ...]]:
    """Every banked tensor of the stream, layer by layer (by name), oldest frame first."""
    frames = stream.temporal.bank._frames
    return [frame for name in sorted(frames) for frame in frames[name]]


@pytest.mark.parametrize("models_name, size", [("tiny", 32), ("tiny", 40), ("tiny", 64), ("tiny-sdxl", 48)])
def test_the_bank_shapes_are_the_eager_unets(tiny_models, tiny_sdxl_models, models_name, size):
    """`bank_layer_shapes` (what the graph's bank inputs and outputs are shaped by) against what the eager UNet's
    self-attention layers hand the bank, at sizes whose latents halve to odd sides too."""
    models = tiny_models if models_name == "tiny" else tiny_sdxl_models
    install_kv_processors(models.unet)
    latents, timesteps, added, text = _unet_samples(models, 2, size // 8, size // 8, None)
    bank = AttentionBank(TemporalSettings())
    kwargs = {"added_cond_kwargs": dict(zip(ADDED_COND_INPUTS, added, strict=True))} if added else {}
    with torch.no_grad():
        models.unet(latents, timesteps, encoder_hidden_states=text, cross_attention_kwargs={"temporal_bank": bank},
                    **kwargs)
    recorded = {name: tuple(tuple(tensor.shape) for tensor in entry) for name, entry in bank._pending.items()}
    assert recorded == bank_layer_shapes(models.unet, 2, size // 8, size // 8)
    assert sorted(recorded) == sorted(self_attention_layers(models.unet))  # called in another order than listed


CASES = [
    # cfg, bank size, interval, threshold, strength, exporter
    pytest.param("self", 2, 1, 0.5, 0.6, "torchscript", id="self-size2-injection"),
    pytest.param("self", 3, 2, 0.9, 0.0, "torchscript", id="self-size3-interval2-no-injection"),
    pytest.param("full", 2, 1, 0.5, 0.6, "torchscript", id="full-size2-injection"),
    pytest.param("self", 2, 1, 0.5, 0.6, "dynamo", id="self-size2-injection-dynamo"),
]


@pytest.mark.parametrize("cfg_type, size, interval, threshold, strength, exporter", CASES)
def test_a_bank_stream_on_onnxruntime_equals_eager(tiny_engine, tiny_models, onnx_cache_dir, cfg_type, size,
                                                   interval, threshold, strength, exporter):
    """Eight frames (the bank filling up, then full and rolling), a reset, three more (filling up again): every
    output and every banked tensor within 1e-4 of eager's."""
    config = bank_config(cfg_type, bank_size=size, bank_interval=interval, injection_threshold=threshold,
                         injection_strength=strength)
    runner = OnnxRuntimeRunner(tiny_models, cfg_type, onnx_cache_dir, exporter=exporter)
    eager = StreamEngine(tiny_engine, config)
    compiled = StreamEngine(tiny_engine.with_runner(runner), config)
    # Prepared at start: the bank graph is open before the first frame.
    assert [shape.bank_size for shape in runner._graphs if shape.network == "unet"] == [size]
    off = StreamEngine(tiny_engine, config.updated(temporal="off"))
    frames = tensor_clip("slow_pan", 11, SIZE, SIZE)
    worst = effect = 0.0
    fill = []
    for index, frame in enumerate(frames):
        if index == 8:
            for stream in (eager, compiled, off):
                stream.reset()
        expected, actual = eager(frame), compiled(frame)
        effect = max(effect, (expected - off(frame)).abs().max().item())
        worst = max(worst, (actual - expected).abs().max().item())
        reference, mine = banked(eager), banked(compiled)
        assert len(mine) == len(reference)
        for eager_frame, compiled_frame in zip(reference, mine, strict=True):
            for a, b in zip(eager_frame, compiled_frame, strict=True):
                assert a.shape == b.shape and (a - b).abs().max().item() < TOLERANCE
        fill.append(len(next(iter(compiled.temporal.bank._frames.values()), ())))
    print(f"bank {cfg_type} size {size} interval {interval} strength {strength} {exporter}: max abs error "
          f"ONNX Runtime vs eager {worst:.2e}; bank vs off {effect:.2e}; frames banked {fill}")
    assert worst < TOLERANCE
    assert effect > 10 * TOLERANCE  # the bank changes the output: the comparison is not vacuous
    assert max(fill) == size and fill[8] < size  # it filled up, and started over after the reset


def test_injection_is_hot_on_one_graph_and_a_new_bank_size_is_prepared(tiny_engine, tiny_models, onnx_cache_dir):
    """`injection_threshold`/`injection_strength` are graph inputs: changing them opens no graph. A new bank size
    opens its graph when asked for (not on a frame) and serves from the next reset, as the eager bank's bound."""
    config = bank_config(bank_size=2, injection_threshold=0.5, injection_strength=0.6)
    runner = OnnxRuntimeRunner(tiny_models, "self", onnx_cache_dir, exporter="torchscript")
    eager = StreamEngine(tiny_engine, config)
    compiled = StreamEngine(tiny_engine.with_runner(runner), config)
    frames = tensor_clip("slow_pan", 8, SIZE, SIZE)
    worst = 0.0
    for index, frame in enumerate(frames):
        if index == 3:
            opened = set(runner._graphs)
            for stream in (eager, compiled):
                stream.update_params(temporal_injection_strength=0.3, temporal_injection_threshold=0.7)
            assert set(runner._graphs) == opened
        if index == 5:
            for stream in (eager, compiled):
                stream.update_params(temporal_bank_size=3)
            assert {shape.bank_size for shape in runner._graphs if shape.network == "unet"} == {2, 3}
            assert compiled.temporal.bank.capacity == 2  # until the reset
            for stream in (eager, compiled):
                stream.reset()
        worst = max(worst, (compiled(frame) - eager(frame)).abs().max().item())
    assert compiled.temporal.bank.capacity == 3 and len(banked(compiled)) == len(banked(eager))
    assert worst < TOLERANCE


def test_the_bank_graphs_inputs_outputs_and_cache_key(tiny_models, tmp_path):
    cache = OnnxCache(tiny_models, "self", tmp_path)
    plain, bank = GraphShape("unet", 2, 64, 64, True, 77), GraphShape("unet", 2, 64, 64, True, 77, bank_size=2)
    layers = list(self_attention_layers(tiny_models.unet))
    assert cache.input_names(bank) == [*cache.input_names(plain), *bank_input_names(layers)]
    assert bank_input_names(layers)[:3] == list(BANK_INPUTS)
    assert cache.output_names(bank) == graph_output_names("unet", bank_layers=layers)
    assert cache.output_names(bank)[1:4] == [f"{layers[0]}.new_key", f"{layers[0]}.new_value",
                                             f"{layers[0]}.new_output"]
    assert len(cache.output_shapes(bank)) == 1 + 3 * len(layers)
    # The key differs with the bank (and its size); without one it is the key graphs always had.
    assert cache.onnx_path(bank) != cache.onnx_path(plain)
    assert cache.onnx_path(bank) != cache.onnx_path(GraphShape("unet", 2, 64, 64, True, 77, bank_size=3))
    assert cache.onnx_path(bank).name.startswith("unet+bank2-64x64-b2-self-float32-")
    assert cache.key_parts(plain).attention_bank == 0 and cache.key_parts(bank).attention_bank == 2
    assert engine_cache_key(cache.key_parts(bank)) != engine_cache_key(cache.key_parts(plain))


def test_a_bank_graph_is_static_inside_a_resolution_range(tiny_models, tmp_path):
    runner = OnnxRuntimeRunner(tiny_models, "self", tmp_path, exporter="torchscript",
                               resolution_range=ResolutionRange.between(32, 128, 64))
    plain, bank = GraphShape("unet", 2, 64, 64, True, 77), GraphShape("unet", 2, 64, 64, True, 77, bank_size=2)
    assert runner.graph_shape(plain).resolution_range is not None
    assert runner.graph_shape(bank) == bank


def test_torch_compile_refuses_a_bank_stream_at_start_naming_the_backends_that_run_it(tiny_engine, tiny_models):
    from engine.backends.compiled import TorchCompileRunner

    with pytest.raises(ValueError, match="eager, onnxruntime or tensorrt .*compile"):
        StreamEngine(tiny_engine.with_runner(TorchCompileRunner(tiny_models)), bank_config())
