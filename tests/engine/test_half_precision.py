"""The whole engine in float16 and bfloat16 on the CPU (issue 18 item 1): what a GPU user's first frame runs.

Every guidance mode with n = 1, 2, 4 steps and f = 1, 2 frames per call, the K/V cache on and off, the
similarity filter, both skip policies, the memory modes, the temporal mechanisms, cross-session batching and
the pipelined runtime. Each output is finite and within `BOUND[dtype]` of the same stream in float32, and
every tensor a stream holds (schedule, fixed and stock noise, buffer, prompt embeddings and K/V, filter
reference, skip caches, temporal state) is on the models' device in the models' dtype — except the skip
policies' per-slot decision statistics and `flow`'s sampling grid, float32 on purpose (`FLOAT32_STATISTICS`).

The bound: images are in [0, 1] and a dtype with machine epsilon ε (`torch.finfo`: float16 2⁻¹⁰ ≈ 9.8e-4,
bfloat16 2⁻⁷ ≈ 7.8e-3) rounds every weight, activation and latent. The largest difference from float32 measured
over these cases on the tiny model (32² and 64², up to 5 frames) is 2.6ε in float16 (0.0025) and 1.9ε in
bfloat16 (0.0147). `BOUND` is 6ε (float16 0.0059, bfloat16 0.047): over twice the worst case, and under what a
half-precision bug costs: `flow`'s sampling grid in the models' dtype gave 10ε and 9ε. Crashes, non-finite
outputs and wrong dtypes are caught by their own assertions.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine, load_models
from engine.batching import step_batch
from engine.codec import encode_jpeg
from engine.memory import SliceSettings, apply_memory_mode
from engine.motion import warp_tensor
from engine.runtime import FrameResult, StreamRuntime
from engine.skip.base import relative_l1
from engine.temporal import input_motion, relative_change

DTYPES = (torch.float16, torch.bfloat16)
BOUND = {dtype: 6 * torch.finfo(dtype).eps for dtype in DTYPES}
SIZE = 32
#: Float32 whatever the models' dtype, on purpose: the skip policies' per-slot decision statistics (relative L1
#: changes, motions), so a large frame's sum cannot overflow and a half-precision stream decides as a float32
#: one; and `flow`'s sampling grid, positions in [-1, 1] that half precision cannot place within a pixel.
FLOAT32_STATISTICS = frozenset({"accumulated", "delta", "last_change", "motion_history", "grid"})
#: References to shared, read-only things a stream holds: not the stream's own state.
SHARED = frozenset({"engine", "models", "runner", "unet_module", "units", "config", "settings"})


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stream_tensors(obj, path: str = "stream", seen: set[int] | None = None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor reachable from a stream's own state, with its path (shared modules and runners left out)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (torch.nn.Module, str, bytes, int, float, bool, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, dict):
        items = [(f"{path}[{key!r}]", value) for key, value in obj.items()]
    elif isinstance(obj, (list, tuple, collections.deque)):
        items = [(f"{path}[{index}]", value) for index, value in enumerate(obj)]
    elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("engine"):
        fields = vars(obj) if hasattr(obj, "__dict__") else {f.name: getattr(obj, f.name)
                                                              for f in dataclasses.fields(obj)}
        items = [(f"{path}.{name}", value) for name, value in fields.items() if name not in SHARED]
    else:
        return []
    return [found for item_path, value in items for found in stream_tensors(value, item_path, seen)]


def misplaced(stream: StreamEngine, dtype: torch.dtype) -> list[tuple[str, torch.dtype, torch.device]]:
    """Tensors of `stream` not on its device, or floating-point but not in `dtype` (statistics excepted)."""
    found = stream_tensors(stream)
    assert any(path.startswith("stream._state.fixed_noise") for path, _ in found)  # the walk reaches the state
    wrong = []
    for path, tensor in found:
        attributes = {part.split("[")[0] for part in path.split(".")}
        statistic = bool(attributes & FLOAT32_STATISTICS)
        expected = torch.float32 if statistic else dtype
        if tensor.device != stream.device or (tensor.is_floating_point() and tensor.dtype != expected):
            wrong.append((path, tensor.dtype, tensor.device))
    return wrong


def frames(count: int, size: int = SIZE, kind: str = "slow_pan") -> list[torch.Tensor]:
    return [torch.from_numpy(frame).permute(2, 0, 1).float() / 255
            for frame in synthetic_clip(kind, count, size, size, seed=5)]


@pytest.fixture(scope="module", params=DTYPES, ids=_name)
def half(request):
    """(dtype, the tiny model prepared in it on the CPU): `Engine.prepare` of models already in that dtype."""
    dtype = request.param
    models = load_models("tiny").to(torch.device("cpu"), dtype)
    return dtype, Engine.prepare(models, LoadConfig(model="tiny", backend="eager", dtype=_name(dtype)))


# float32 outputs per (engine, config, frames), shared by both dtypes' tests.
_references: dict[tuple, list[torch.Tensor]] = {}


def run_both(half_engine: Engine, float_engine: Engine, config: StreamConfig, inputs: list[torch.Tensor],
             dtype: torch.dtype) -> tuple[StreamEngine, float]:
    """Run `inputs` through a stream of each engine; returns the half stream and the largest difference."""
    batches = [torch.stack([frame] * config.frame_buffer_size) if config.frame_buffer_size > 1 else frame
               for frame in inputs]
    key = (id(float_engine), config, len(inputs), float(inputs[0].sum()))
    if key not in _references:
        reference = StreamEngine(float_engine, config)
        _references[key] = [reference(batch) for batch in batches]
    stream, worst = StreamEngine(half_engine, config), 0.0
    for batch, expected in zip(batches, _references[key], strict=True):
        output = stream(batch)
        assert output.dtype == dtype and output.device == stream.device
        assert output.shape == expected.shape
        assert torch.isfinite(output).all()
        worst = max(worst, (output.float() - expected).abs().max().item())
    return stream, worst


STEPS = {1: (32,), 2: (32, 45), 4: (10, 20, 32, 45)}
CFG_TYPES = ("none", "self", "initialize", "full")
#: Every guidance mode with every n, f alternating between 1 and 2 so that each mode, and each n, also runs with
#: both f (every pair of the three settings is covered; the full product costs twice the time for no new path).
MATRIX = [(cfg_type, steps, 1 + (mode + index) % 2)
          for mode, cfg_type in enumerate(CFG_TYPES) for index, steps in enumerate(STEPS)]


@pytest.mark.parametrize(("cfg_type", "steps", "frame_buffer_size"), MATRIX)
def test_every_guidance_mode_steps_and_frame_buffer(half, tiny_engine, cfg_type, steps, frame_buffer_size):
    dtype, engine = half
    config = StreamConfig(width=SIZE, height=SIZE, cfg_type=cfg_type, t_index_list=STEPS[steps],
                          frame_buffer_size=frame_buffer_size, similarity_filter=False)
    # The first frame primes the buffer (n − 1 calls), the second is a steady stream-batch call.
    stream, worst = run_both(engine, tiny_engine, config, frames(2), dtype)
    assert worst < BOUND[dtype]
    assert misplaced(stream, dtype) == []
    schedule = stream._state.schedule
    assert schedule.timesteps.dtype == torch.long  # indices, not values: integer in every dtype


@pytest.mark.parametrize("cfg_type", ["self", "full"])
def test_sequential_steps_and_no_kv_cache(half, tiny_engine, tiny_models, cfg_type):
    dtype, engine = half
    config = StreamConfig(width=SIZE, height=SIZE, cfg_type=cfg_type, stream_batch=False, similarity_filter=False)
    stream, worst = run_both(engine, tiny_engine, config, frames(2), dtype)
    assert worst < BOUND[dtype] and misplaced(stream, dtype) == []
    uncached = Engine.prepare(engine.models, LoadConfig(model="tiny", backend="eager", dtype=_name(dtype),
                                                        kv_cache=False))
    uncached_float = Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager", kv_cache=False))
    stream, worst = run_both(uncached, uncached_float, config.replace(stream_batch=True), frames(2), dtype)
    assert all(conditioning.kv_cache is None for conditioning in stream._prompt.layouts.values())
    assert worst < BOUND[dtype] and misplaced(stream, dtype) == []


def test_similarity_filter_skips_still_frames(half):
    dtype, engine = half
    stream = StreamEngine(engine, StreamConfig(width=SIZE, height=SIZE, similarity_filter=True))
    still = frames(1)[0]
    outputs = [stream(still) for _ in range(12)]
    assert stream.frames_skipped > 0
    assert all(torch.isfinite(output).all() and output.dtype == dtype for output in outputs)
    assert stream._filter._reference.dtype == dtype
    assert misplaced(stream, dtype) == []


@pytest.mark.parametrize("policy", ["rehash", "adacache"])
def test_skip_policies(half, tiny_engine, policy):
    dtype, engine = half
    config = StreamConfig(width=SIZE, height=SIZE, skip_policy=policy, similarity_filter=False)
    stream, worst = run_both(engine, tiny_engine, config, frames(5), dtype)
    assert stream.skip_policy.stats.rows_total > 0
    assert worst < BOUND[dtype] and misplaced(stream, dtype) == []


@pytest.mark.parametrize("temporal", ["feedback", "bank", "flow"])
def test_temporal_mechanisms(half, tiny_engine, temporal):
    dtype, engine = half
    config = StreamConfig(width=SIZE, height=SIZE, temporal=temporal, similarity_filter=False)
    stream, worst = run_both(engine, tiny_engine, config, frames(4), dtype)
    assert worst < BOUND[dtype] and misplaced(stream, dtype) == []


@pytest.mark.parametrize("memory", ["slice", "group"])
def test_memory_modes(half, tiny_engine, memory):
    dtype, _ = half
    models = load_models("tiny").to(torch.device("cpu"), dtype)
    engine = Engine.prepare(models, LoadConfig(model="tiny", backend="eager", dtype=_name(dtype), memory=memory))
    # Small slices, so every wrapper runs at this size (the defaults engage from 512² on).
    apply_memory_mode(models, memory, SliceSettings(query_rows=8, feed_forward_tokens=8, band_rows=8,
                                                    spatial_min_pixels=16, resnet_band_rows=4, resnet_min_pixels=16))
    config = StreamConfig(width=SIZE, height=SIZE, similarity_filter=False)
    stream, worst = run_both(engine, tiny_engine, config, frames(2), dtype)
    assert worst < BOUND[dtype] and misplaced(stream, dtype) == []


def test_cross_session_batching(half):
    dtype, engine = half
    configs = [StreamConfig(width=SIZE, height=SIZE, similarity_filter=False, prompt=prompt)
               for prompt in ("a watercolor painting", "a pencil sketch")]
    batched = [StreamEngine(engine, config) for config in configs]
    alone = [StreamEngine(engine, config) for config in configs]
    for frame in frames(2):
        outputs = [result.images for result in step_batch(batched, [frame, frame])]
        for stream, output in zip(alone, outputs, strict=True):
            expected = stream(frame)
            assert output.dtype == dtype and torch.isfinite(output).all()
            # The same dtype both ways: only the batched convolutions' summation order differs.
            assert (output.float() - expected.float()).abs().max().item() < BOUND[dtype]
    assert all(misplaced(stream, dtype) == [] for stream in batched)


def test_pipelined_runtime(half):
    dtype, engine = half
    runtime = StreamRuntime(engine, StreamConfig(width=SIZE, height=SIZE, similarity_filter=False))
    try:
        handles = [runtime.open_stream(), runtime.open_stream(prompt="a pencil sketch")]
        for index, frame in enumerate(synthetic_clip("fast_motion", 3, SIZE, SIZE, seed=2)):
            for handle in handles:
                assert handle.put(encode_jpeg(frame)) == index
            for handle in handles:
                result = handle.get(timeout=60)
                assert isinstance(result, FrameResult) and result.error is None and result.seq == index
        assert runtime.status().failure is None
        assert all(misplaced(handle.engine, dtype) == [] for handle in handles)
    finally:
        runtime.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_change_statistics_of_large_half_precision_frames_do_not_overflow(dtype):
    """A 1024² frame's latents (4×128×128 values near 1) sum past float16's largest value, 65,504."""
    reference = torch.ones(2, 4, 128, 128, dtype=dtype)
    changed = reference * 0.75  # exact in both dtypes
    assert relative_l1(changed, reference, reference).dtype == torch.float32
    assert torch.allclose(relative_l1(changed, reference, reference), torch.full((2,), 0.25))
    assert relative_change(changed, reference) == pytest.approx(0.25)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_flow_carries_half_precision_outputs_to_the_right_pixel(dtype):
    """`flow`'s grid holds positions in [-1, 1]: in bfloat16 (steps of 2⁻⁷ near ±1) a still 256² frame's grid sent
    pixels up to one column over, which turns one-pixel stripes into their neighbours."""
    still = np.zeros((256, 256, 3), dtype=np.uint8)
    motion = input_motion(still, still, cut_threshold=0.3, device=torch.device("cpu"), dtype=dtype)
    assert motion.grid.dtype == torch.float32 and motion.mask.dtype == dtype
    stripes = (torch.arange(256) % 2).to(dtype).expand(1, 3, 256, 256)
    carried = warp_tensor(stripes, motion.grid, mode="bicubic")
    assert carried.dtype == dtype
    assert (carried.float() - stripes.float()).abs().max().item() < BOUND[dtype]
