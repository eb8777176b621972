"""The engine's contract with its streams: a loaded `Engine` is shared read-only.

A per-stream engine (`StreamEngine`, or a runtime stream) never changes the shared models or their scheduler:
streams with different per-stream parameters leave the weights, the attention processors and the scheduler
exactly as loading left them. And a stream cannot change a load-time setting: asking to is a `ValueError`
that names the setting as a load-time one.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine, load_models
from engine.codec import encode_jpeg, rgb_to_tensor
from engine.config import RuntimeOptions
from engine.memory import memory_mode
from engine.runtime import FrameResult, StreamRuntime

SIZE = 32

# Two streams that differ in every per-stream parameter that touches the shared models: prompt, schedule
# (steps and their count), guidance mode and scale, skip policy (rehash runs the UNet piecewise, off does not).
FIRST = dict(prompt="a red fox in the snow", t_index_list=(32, 45), cfg_type="self", guidance_scale=1.2,
             skip_policy="rehash", rehash_interval=2, prompt_transition_frames=2)
SECOND = dict(prompt="a city at night", negative_prompt="dark, blurry", t_index_list=(0, 16, 32),
              num_inference_steps=40, cfg_type="full", guidance_scale=2.0, skip_policy="off", seed=7,
              seed_transition_frames=2)
# Hot updates that fade: a blend of prompts (K/V blended from each prompt's cache), a blend of seeds.
FIRST_FADE = dict(prompts=(("a red fox", 0.6), ("snow", 0.4)))
SECOND_FADE = dict(seeds=((3, 0.5), (9, 0.5)), prompts=(("a city", 0.5), ("night", 0.5)), prompt_blend="slerp")
# Updates mid-way: a new prompt and schedule (re-prepare), a new guidance scale, a policy switched on or off.
FIRST_UPDATE = dict(prompt="a pencil sketch", t_index_list=(20, 40), guidance_scale=1.6, skip_policy="off")
SECOND_UPDATE = dict(t_index_list=(10, 30), guidance_scale=1.4, skip_policy="rehash", seed=3)


@pytest.fixture(params=["tiny", "tiny-sdxl"])
def engine(request):
    """A private tiny model set (of each family), loaded as a server loads it: nothing else touches it, so its
    scheduler is as loading left it (no `set_timesteps` yet) and any change a stream makes shows."""
    return Engine.prepare(load_models(request.param), LoadConfig(model=request.param, backend="eager"))


def networks(engine: Engine) -> tuple[str, ...]:
    return ("unet", "vae", *engine.models.text_encoders())


def stream_config(**params) -> StreamConfig:
    return StreamConfig(width=SIZE, height=SIZE, similarity_filter=False).updated(**params)


def _copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def snapshot(engine: Engine) -> dict:
    """Everything of the shared models a stream could change, copied."""
    models = engine.models
    scheduler = models.scheduler
    return {
        "weights": {name: {key: tensor.clone() for key, tensor in getattr(models, name).state_dict().items()}
                    for name in networks(engine)},
        "processors": dict(models.unet.attn_processors),
        "modules": {name: [(path, type(module)) for path, module in getattr(models, name).named_modules()]
                    for name in networks(engine)},
        "patched": {name: [path for path, module in getattr(models, name).named_modules() if "forward" in vars(module)]
                    for name in networks(engine)},
        "memory": memory_mode(models),
        "scheduler_config": dict(scheduler.config),
        "timesteps": _copy(scheduler.timesteps),
        "num_inference_steps": scheduler.num_inference_steps,
        "scheduler_state": {key: _copy(value) for key, value in vars(scheduler).items()},
    }


def _same(actual, expected) -> bool:
    if isinstance(expected, torch.Tensor):
        return isinstance(actual, torch.Tensor) and actual.shape == expected.shape and torch.equal(actual, expected)
    return actual == expected


def assert_unchanged(engine: Engine, before: dict) -> None:
    # Only locals appear in these asserts: pytest's explanation of a failing `scheduler.x` would call
    # `repr(scheduler)`, and diffusers' `ConfigMixin.__repr__` writes `_class_name` into the config it prints.
    after = snapshot(engine)
    for name in networks(engine):
        state, reference = after["weights"][name], before["weights"][name]
        assert state.keys() == reference.keys(), name
        changed = [key for key, tensor in reference.items() if not torch.equal(state[key], tensor)]
        assert changed == [], f"{name} weights changed: {changed[:5]}"
    processors, reference = after["processors"], before["processors"]
    assert processors.keys() == reference.keys()
    assert all(processors[name] is processor for name, processor in reference.items())
    assert after["modules"] == before["modules"] and after["patched"] == before["patched"]
    assert after["memory"] == before["memory"]
    config, timesteps, steps = after["scheduler_config"], after["timesteps"], after["num_inference_steps"]
    assert config == before["scheduler_config"]
    assert _same(timesteps, before["timesteps"]), (timesteps, before["timesteps"])
    assert steps == before["num_inference_steps"]
    state, reference = after["scheduler_state"], before["scheduler_state"]
    assert state.keys() == reference.keys()
    changed = [key for key, value in reference.items() if not _same(state[key], value)]
    assert changed == [], f"scheduler attributes changed: {changed}"


def clip(count: int, seed: int) -> list[torch.Tensor]:
    return [rgb_to_tensor(frame) for frame in synthetic_clip("fast_motion", count, SIZE, SIZE, seed)]


def test_streams_never_change_the_shared_models_or_scheduler(engine):
    before = snapshot(engine)
    first, second = StreamEngine(engine, stream_config(**FIRST)), StreamEngine(engine, stream_config(**SECOND))
    assert first.skip_policy is not None and second.skip_policy is None
    first_frames, second_frames = clip(6, seed=1), clip(6, seed=2)
    outputs = []
    for index, (a, b) in enumerate(zip(first_frames, second_frames, strict=True)):
        if index == 1:
            first.update_params(**FIRST_FADE)
            second.update_params(**SECOND_FADE)
        if index == 3:
            first.update_params(**FIRST_UPDATE)
            second.update_params(**SECOND_UPDATE)
            assert first.skip_policy is None and second.skip_policy is not None
        outputs.append((first(a), second(b)))
    assert all(output.shape == (3, SIZE, SIZE) for pair in outputs for output in pair)
    assert first.frames_processed == second.frames_processed == 6
    assert_unchanged(engine, before)


def test_runtime_streams_never_change_the_shared_models_or_scheduler(engine):
    """The same through the runtime, where streams of one engine share batched UNet calls."""
    before = snapshot(engine)
    frames = [encode_jpeg(frame) for frame in synthetic_clip("slow_pan", 6, SIZE, SIZE, 3)]
    defaults = StreamConfig(width=SIZE, height=SIZE, similarity_filter=False)
    with StreamRuntime(engine, defaults, RuntimeOptions(max_batch=3)) as runtime:
        handles = [runtime.open_stream(max_in_flight=6, **FIRST), runtime.open_stream(max_in_flight=6, **SECOND),
                   runtime.open_stream(max_in_flight=6, prompt="a third stream", cfg_type="initialize")]
        for index, data in enumerate(frames):
            if index == 1:
                handles[0].update(**FIRST_FADE)
                handles[1].update(**SECOND_FADE)
            if index == 3:
                handles[0].update(**FIRST_UPDATE)
                handles[1].update(**SECOND_UPDATE)
            for handle in handles:
                handle.put(data)
            for handle in handles:
                answer = handle.get(timeout=60)
                assert isinstance(answer, FrameResult) and answer.error is None, answer
        assert runtime.status().inference_errors == 0
    assert_unchanged(engine, before)


def test_the_check_sees_a_changed_scheduler(engine):
    """The scheduler check can fail: a stream that ran `set_timesteps` on the shared scheduler is caught."""
    before = snapshot(engine)
    engine.models.scheduler.set_timesteps(40)
    try:
        with pytest.raises(AssertionError):
            assert_unchanged(engine, before)
    finally:
        vars(engine.models.scheduler).clear()
        vars(engine.models.scheduler).update(before["scheduler_state"])
    assert_unchanged(engine, before)


@pytest.mark.parametrize("setting", [{"backend": "onnxruntime"}, {"dtype": "float16"}, {"model": "small"},
                                     {"kv_cache": False}, {"memory": "slice"}, {"vae": "full"}])
def test_a_stream_cannot_change_a_load_time_setting(engine, setting):
    (name, _), = setting.items()
    stream = StreamEngine(engine, stream_config())
    config = stream.config
    with pytest.raises(ValueError, match=f"`{name}` is a load-time setting"):
        stream.update_params(**setting)
    with pytest.raises(ValueError, match=f"`{name}` is a load-time setting"):
        stream.update_params(guidance_scale=2.0, **setting)  # all or nothing: the valid change is not applied
    assert stream.config is config


def test_a_runtime_stream_cannot_open_or_update_with_a_load_time_setting(engine):
    with StreamRuntime(engine, StreamConfig(width=SIZE, height=SIZE)) as runtime:
        with pytest.raises(ValueError, match="`dtype` is a load-time setting"):
            runtime.open_stream(dtype="float16")
        assert runtime.streams == []
        handle = runtime.open_stream()
        with pytest.raises(ValueError, match="`backend` is a load-time setting"):
            handle.update(backend="onnxruntime")
        assert handle.config == StreamConfig(width=SIZE, height=SIZE)
        with pytest.raises(ValueError, match="unknown stream parameter"):
            runtime.open_stream(not_a_parameter=1)
