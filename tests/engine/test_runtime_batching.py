"""The runtime's batched inference: fair across flooding streams, frames of several streams per call."""

from __future__ import annotations

import threading

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import StreamConfig
from engine.backends import EagerRunner
from engine.codec import encode_jpeg
from engine.config import RuntimeOptions
from engine.runtime import FrameResult, StreamRuntime

SIZE = 32
FRAMES_PER_STREAM = 10


class CountingRunner(EagerRunner):
    """The eager runner, recording the rows of every UNet call."""

    def __init__(self, models):
        super().__init__(models)
        self.unet_rows: list[int] = []

    def unet(self, latents, timesteps, conditioning):
        self.unet_rows.append(latents.shape[0])
        return super().unet(latents, timesteps, conditioning)


@pytest.fixture(scope="module")
def frames():
    return [encode_jpeg(frame) for frame in synthetic_clip("fast_motion", FRAMES_PER_STREAM, SIZE, SIZE)]


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch"):
        RuntimeOptions(max_batch=0)


def test_flooding_streams_are_served_fairly_in_shared_calls(tiny_models, tiny_engine, with_runner, frames):
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(32, 45), similarity_filter=False)
    runner = CountingRunner(tiny_models)
    order: list[int] = []
    order_lock = threading.Lock()
    with StreamRuntime(with_runner(tiny_engine, runner), config, RuntimeOptions(max_batch=2)) as runtime:
        handles = []
        for index in range(3):
            def delivered(index=index):
                with order_lock:
                    order.append(index)
            handles.append(runtime.open_stream(max_in_flight=FRAMES_PER_STREAM, notify=delivered))
        for frame in frames:  # interleaved, so every stream has frames waiting from the start
            for handle in handles:
                handle.put(frame)
        for handle in handles:
            seqs = [handle.get(timeout=60) for _ in range(FRAMES_PER_STREAM)]
            # Every frame accepted (none dropped) and answered, in order.
            assert all(isinstance(result, FrameResult) and result.error is None for result in seqs)
            assert [result.seq for result in seqs] == list(range(FRAMES_PER_STREAM))
    assert len(order) == 3 * FRAMES_PER_STREAM
    # While every stream still floods (all but the last batches), output counts stay within one.
    counts = [0, 0, 0]
    for index in order[:2 * FRAMES_PER_STREAM]:
        counts[index] += 1
        assert max(counts) - min(counts) <= 1, order
    # Two streams' rows per UNet call after priming: the frames really shared calls.
    assert runner.unet_rows.count(2 * 2) >= FRAMES_PER_STREAM


def test_batch_wait_must_not_be_negative():
    with pytest.raises(ValueError, match="batch_wait_s"):
        RuntimeOptions(batch_wait_s=-1)


def _slow_begin(engine, seconds: float) -> None:
    """Keep `engine`'s frames in the input stage for `seconds` longer than they need."""
    begin = engine.begin

    def slow(image):
        threading.Event().wait(seconds)
        return begin(image)

    engine.begin = slow


@pytest.mark.parametrize(("batch_wait_s", "passes"), [(0.0, 2), (30.0, 1)])
def test_a_partial_batch_waits_for_frames_still_in_the_input_stage(tiny_engine, frames, batch_wait_s, passes):
    config = StreamConfig(width=SIZE, height=SIZE, similarity_filter=False)
    with StreamRuntime(tiny_engine, config, RuntimeOptions(max_batch=2, batch_wait_s=batch_wait_s)) as runtime:
        fast, slow = runtime.open_stream(), runtime.open_stream()
        _slow_begin(slow.engine, 0.5)
        assert fast.put(frames[0]) == 0 and slow.put(frames[0]) == 0
        results = [fast.get(timeout=60), slow.get(timeout=60)]
        assert all(isinstance(result, FrameResult) and result.error is None for result in results)
        # Without a window the fast stream's frame goes alone; with one, both share a pass.
        status = runtime.status()
        assert (status.batches, status.frames_inferred) == (passes, 2)


def test_the_window_does_not_hold_a_frame_when_nothing_else_is_coming(tiny_engine, frames):
    config = StreamConfig(width=SIZE, height=SIZE, similarity_filter=False)
    with StreamRuntime(tiny_engine, config, RuntimeOptions(max_batch=4, batch_wait_s=600.0)) as runtime:
        active, _idle = runtime.open_stream(), runtime.open_stream()
        for frame in frames[:3]:
            active.put(frame)
            result = active.get(timeout=60)  # would wait the whole 600 s window if it held the frame
            assert isinstance(result, FrameResult) and result.error is None


class OutOfMemoryRunner(EagerRunner):
    """The eager runner on a device that holds one stream's UNet rows per call: more run out of memory."""

    def __init__(self, models, rows_that_fit: int):
        super().__init__(models)
        self.rows_that_fit = rows_that_fit
        self.unet_rows: list[int] = []

    def unet(self, latents, timesteps, conditioning):
        self.unet_rows.append(latents.shape[0])
        if latents.shape[0] > self.rows_that_fit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {latents.shape[0]} rows")
        return super().unet(latents, timesteps, conditioning)


def test_a_batch_that_runs_out_of_memory_costs_its_frames_then_batches_shrink(tiny_models, tiny_engine, with_runner,
                                                                             frames):
    """Issue 28 item 2: each frame of the failing call is answered with the error, and the runtime stops batching
    more streams than fit instead of failing every frame after it."""
    config = StreamConfig(width=SIZE, height=SIZE, t_index_list=(32, 45), similarity_filter=False)
    runner = OutOfMemoryRunner(tiny_models, rows_that_fit=2)  # one stream: 2 rows
    with StreamRuntime(with_runner(tiny_engine, runner), config, RuntimeOptions(max_batch=4)) as runtime:
        handles = [runtime.open_stream(max_in_flight=FRAMES_PER_STREAM) for _ in range(3)]
        for frame in frames:
            for handle in handles:
                handle.put(frame)
        answers = [[handle.get(timeout=60) for _ in range(FRAMES_PER_STREAM)] for handle in handles]
        status = runtime.status()
    failed = [answer for stream in answers for answer in stream if answer.error is not None]
    assert failed and all(answer.error.code == "inference_failed" and "out of memory" in answer.error.message
                          for answer in failed)
    assert len(failed) <= 4  # the frames of the one shared call that failed (priming may share it)
    assert all(answer.error is None for stream in answers for answer in stream[2:])  # later frames all served
    assert status.batch_limit == 1 and status.inference_errors >= 1
    assert max(runner.unet_rows[-5:]) <= 2  # one stream per call from then on
