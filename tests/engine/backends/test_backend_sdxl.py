"""SDXL on ONNX Runtime: the UNet graph takes the added conditioning and equals the eager engine."""

from __future__ import annotations

import onnx
import pytest
import torch

from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.backends.artifacts import onnx_input_shapes
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.backends.tensorrt import profile_shapes

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4
SIZE = 64


def _frames(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.rand(3, SIZE, SIZE, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("kv_cache", [True, False])
def test_sdxl_on_onnxruntime_equals_eager(tiny_sdxl_models, kv_cache):
    config = StreamConfig(width=SIZE, height=SIZE, cfg_type="full", similarity_filter=False, prompt="a red fox")
    load = LoadConfig(model="tiny-sdxl", kv_cache=kv_cache, backend="eager")
    eager = StreamEngine(Engine.prepare(tiny_sdxl_models, load), config)
    compiled = StreamEngine(Engine.prepare(tiny_sdxl_models, LoadConfig(model="tiny-sdxl", kv_cache=kv_cache,
                                                                        backend="onnxruntime")), config)
    assert isinstance(compiled.runner, OnnxRuntimeRunner)
    worst = 0.0
    for index, frame in enumerate(_frames(5)):
        if index == 3:  # a new prompt reaches the graph through its text inputs
            for stream in (eager, compiled):
                stream.update_params(prompt="an oil painting", prompt_transition_frames=0)
        worst = max(worst, (compiled(frame) - eager(frame)).abs().max().item())
    assert worst < TOLERANCE
    path = next(path for path in compiled.runner.prepare(config, kv_cache) if path.name.startswith("unet"))
    names = [value.name for value in onnx.load(str(path), load_external_data=False).graph.input]
    assert names[:4] == ["latents", "timesteps", "text_embeds", "time_ids"]
    if kv_cache:
        assert len(names) > 4 and all(name.endswith((".key", ".value")) for name in names[4:])
    else:
        assert names[4:] == ["encoder_hidden_states"]
    # TensorRT builds from the same graph: its profile pins the added inputs (full guidance: 2 × 2 slots).
    profile = profile_shapes(onnx_input_shapes(path))
    pooled = tiny_sdxl_models.text_encoder_2.config.projection_dim
    assert profile["text_embeds"] == ((4, pooled),) * 3 and profile["time_ids"] == ((4, 6),) * 3
