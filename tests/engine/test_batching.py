"""Cross-session batching: a session's output in a batch equals its output alone, with shared calls."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine import Engine, LoadConfig, StreamConfig
from engine.backends import EagerRunner
from engine.batching import batch_key, step_batch
from engine.stream import StreamEngine

SIZE = 64


class CountingRunner(EagerRunner):
    """The eager runner, counting the rows of every network call."""

    def __init__(self, models):
        super().__init__(models)
        self.unet_rows: list[int] = []
        self.decode_rows: list[int] = []

    def unet(self, latents, timesteps, conditioning):
        self.unet_rows.append(latents.shape[0])
        return super().unet(latents, timesteps, conditioning)

    def decode(self, latents):
        self.decode_rows.append(latents.shape[0])
        return super().decode(latents)


def make_config(**changes) -> StreamConfig:
    base = dict(width=SIZE, height=SIZE, t_index_list=(20, 32, 45), similarity_filter=False, seed=3)
    return StreamConfig(**{**base, **changes})


def random_frames(count: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand((3, SIZE, SIZE), generator=generator) for _ in range(count)]


SESSIONS = [
    dict(prompt="a red fox in snow", cfg_type="self"),
    dict(prompt="a city at night", cfg_type="self", seed=11, guidance_scale=1.8, delta=0.7),
    dict(prompt="an oil painting", cfg_type="initialize", negative_prompt="blurry", guidance_scale=1.4),
    dict(prompt="a watercolour", cfg_type="full", negative_prompt="dark", guidance_scale=1.6),
    dict(prompt="pencil sketch", cfg_type="none", t_index_list=(32, 45)),
]


def test_a_session_in_a_batch_equals_the_session_alone(tiny_models, tiny_engine, with_runner):
    runner = CountingRunner(tiny_models)
    counting = with_runner(tiny_engine, runner)
    batched = [StreamEngine(counting, make_config(**changes)) for changes in SESSIONS]
    alone = [StreamEngine(tiny_engine, make_config(**changes)) for changes in SESSIONS]
    assert len({batch_key(engine) for engine in batched}) == 1
    streams = [random_frames(4, seed=index) for index in range(len(SESSIONS))]
    for step in range(4):
        inputs = [frames[step] for frames in streams]
        runner.unet_rows.clear()
        runner.decode_rows.clear()
        results = step_batch(batched, inputs)
        if step > 0:  # the first frame primes each buffer alone; then one shared UNet call advances every session
            assert len(runner.unet_rows) == 1
        assert runner.decode_rows == [1] * len(SESSIONS)  # the VAE runs per frame (pipelined in the runtime)
        outputs = []
        for engine, result, image in zip(alone, results, inputs, strict=True):
            expected = engine.step(image)
            assert not result.skipped and result.images.shape == (3, SIZE, SIZE)
            torch.testing.assert_close(result.images, expected.images, atol=1e-5, rtol=0)
            outputs.append(result.images)
        for first, second in itertools.combinations(outputs, 2):
            assert (first - second).abs().max() > 1e-2  # the sessions differ, so the comparison means something
    for engine, reference in zip(batched, alone, strict=True):
        torch.testing.assert_close(engine._state.buffer, reference._state.buffer, atol=1e-4, rtol=1e-4)
        if reference._state.stock_noise is not None:
            torch.testing.assert_close(engine._state.stock_noise, reference._state.stock_noise, atol=1e-4, rtol=1e-4)


def test_a_skipped_frame_stays_out_of_the_unet_batch(tiny_models, tiny_engine, with_runner):
    runner = CountingRunner(tiny_models)
    counting = with_runner(tiny_engine, runner)
    still = make_config(similarity_filter=True, similarity_threshold=0.9, max_skip_frames=10)
    engines = [StreamEngine(counting, still), StreamEngine(counting, make_config())]
    frame, moving = random_frames(1, seed=5)[0], random_frames(2, seed=6)
    step_batch(engines, [frame, moving[0]])
    runner.unet_rows.clear()
    results = step_batch(engines, [frame, moving[1]])
    assert results[0].skipped and not results[1].skipped
    assert runner.unet_rows == [engines[1]._state.buffer.shape[0] + 1]
    assert engines[0].frames_skipped == 1


def test_engines_that_cannot_batch_run_alone_exactly(tiny_models, tiny_engine, with_runner):
    runner = CountingRunner(tiny_models)
    counting = with_runner(tiny_engine, runner)
    other_size = make_config(width=32, height=32)
    sequential = make_config(stream_batch=False)
    engines = [StreamEngine(counting, make_config()),
               StreamEngine(counting, other_size),
               StreamEngine(counting, sequential)]
    assert batch_key(engines[2]) is None and batch_key(engines[0]) != batch_key(engines[1])
    alone = [StreamEngine(tiny_engine, engine.config) for engine in engines]
    inputs = [torch.rand(3, SIZE, SIZE), torch.rand(3, 32, 32), torch.rand(3, SIZE, SIZE)]
    for result, engine, image in zip(step_batch(engines, inputs), alone, inputs, strict=True):
        assert torch.equal(result.images, engine.step(image).images)


def test_bad_input_advances_no_stream(tiny_engine):
    engines = [StreamEngine(tiny_engine, make_config()) for _ in range(2)]
    with pytest.raises(ValueError, match="expected 1 frame"):
        step_batch(engines, [torch.rand(3, SIZE, SIZE), torch.rand(3, 32, 32)])
    assert all(engine.frames_processed == 0 and engine._state.buffer is None for engine in engines)
    with pytest.raises(ValueError, match="only once"):
        step_batch([engines[0], engines[0]], [torch.rand(3, SIZE, SIZE)] * 2)


def test_streams_batch_only_within_one_loaded_engine(tiny_models, tiny_engine):
    """The key names the loaded `Engine` (models, dtype, device and K/V mode are its load-time settings) and the
    frame size: streams of one engine share it whatever their own parameters; another engine's never do."""
    first = StreamEngine(tiny_engine, make_config(prompt="a", cfg_type="full", seed=1))
    second = StreamEngine(tiny_engine, make_config(prompt="b", cfg_type="none", t_index_list=(32, 45)))
    assert batch_key(first) == batch_key(second) == (id(first.runner), id(tiny_engine), SIZE, SIZE)
    uncached = Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager", kv_cache=False))
    other = StreamEngine(uncached, make_config(prompt="a", cfg_type="full", seed=1))
    assert other.kv_cache is False and first.kv_cache is True
    assert batch_key(other) is not None and batch_key(other) != batch_key(first)
    assert batch_key(StreamEngine(tiny_engine, make_config(width=32))) != batch_key(first)
    assert batch_key(StreamEngine(tiny_engine, make_config(skip_policy="rehash"))) is None
