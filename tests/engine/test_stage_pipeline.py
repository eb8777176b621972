"""The engine's three stages (begin → advance → finish) and the runtime that pipelines them on three threads."""

from __future__ import annotations

import threading

import pytest
import torch

from benchmarks.clips import synthetic_clip
from engine import StreamConfig, StreamEngine
from engine.backends import EagerRunner
from engine.batching import advance_batch
from engine.codec import encode_jpeg
from engine.runtime import FrameResult, StreamRuntime

SIZE = 32
WAIT_S = 20.0


def make_config(**changes) -> StreamConfig:
    return StreamConfig(width=SIZE, height=SIZE, t_index_list=(32, 45), similarity_filter=False, **changes)


class StageRecordingRunner(EagerRunner):
    """The eager runner, recording which thread ran each network call.

    Its second UNet call (the first after priming) waits until the VAE encodes another frame: a runtime
    that ran the VAE on the UNet's thread could never get there, and the call would time out.
    """

    def __init__(self, models):
        super().__init__(models)
        self.threads: dict[str, set[str]] = {"encode": set(), "unet": set(), "decode": set()}
        self.encodes = 0
        self.unet_calls = 0
        self.overlapped: bool | None = None
        self._encoded_during_unet = threading.Event()

    def encode(self, images):
        self.threads["encode"].add(threading.current_thread().name)
        self.encodes += 1
        if self.encodes == 3:
            self._encoded_during_unet.set()
        return super().encode(images)

    def unet(self, latents, timesteps, conditioning):
        self.threads["unet"].add(threading.current_thread().name)
        self.unet_calls += 1
        if self.unet_calls == 2:
            self.overlapped = self._encoded_during_unet.wait(WAIT_S)
        return super().unet(latents, timesteps, conditioning)

    def decode(self, latents):
        self.threads["decode"].add(threading.current_thread().name)
        return super().decode(latents)


def test_step_is_its_three_stages(tiny_engine):
    frames = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    whole, staged = StreamEngine(tiny_engine, make_config()), StreamEngine(tiny_engine, make_config())
    for frame in frames:
        expected = whole.step(frame)
        result = staged.finish(staged.advance(staged.begin(frame)))
        assert torch.equal(result.images, expected.images) and result.skipped == expected.skipped


def test_runtime_runs_the_vae_beside_the_unet(tiny_models, tiny_engine, with_runner):
    runner = StageRecordingRunner(tiny_models)
    clip = [encode_jpeg(frame) for frame in synthetic_clip("fast_motion", 3, SIZE, SIZE)]
    with StreamRuntime(with_runner(tiny_engine, runner), make_config()) as runtime:
        handle = runtime.open_stream(max_in_flight=len(clip))
        for data in clip:
            handle.put(data)
        results = [handle.get(timeout=60) for _ in clip]
    # Every frame accepted and answered with an output, in order.
    assert all(isinstance(result, FrameResult) for result in results)
    assert [result.seq for result in results] == list(range(len(clip)))
    assert all(result.error is None and result.jpeg for result in results)
    assert runner.threads["encode"] <= {"stream-decode-0", "stream-decode-1"}
    assert runner.threads["unet"] == {"stream-inference"} and runner.threads["decode"] == {"stream-encode"}
    assert runner.overlapped is True  # a later frame was encoded while the UNet call was running


def test_a_frame_encoded_before_a_size_change_is_refused_alone(tiny_engine):
    engine = StreamEngine(tiny_engine, make_config())
    engine.step(torch.rand(3, SIZE, SIZE))
    stale = engine.begin(torch.rand(3, SIZE, SIZE))
    engine.update_params(width=48, height=48)
    with pytest.raises(ValueError, match="size changed"):
        engine.advance(stale)
    assert engine.step(torch.rand(3, 48, 48)).images.shape == (3, 48, 48)


def test_a_skipped_frame_without_an_earlier_output_is_an_error(tiny_engine):
    config = make_config().replace(similarity_filter=True, similarity_threshold=0.9, max_skip_frames=10)
    engine, image = StreamEngine(tiny_engine, config), torch.rand(3, SIZE, SIZE)
    first = engine.begin(image)
    repeat = engine.begin(image)  # identical input: the filter skips it with probability 1
    assert not first.skipped and repeat.skipped
    with pytest.raises(ValueError, match="no earlier output"):
        engine.finish(engine.advance(repeat))  # as if `first` had failed and never finished
    engine.finish(engine.advance(first))
    assert torch.equal(engine.finish(engine.advance(engine.begin(image))).images, first.output[0])


def test_a_failing_frame_in_a_batch_fails_only_itself(tiny_engine):
    engines = [StreamEngine(tiny_engine, make_config(prompt=f"stream {i}")) for i in range(3)]
    for engine in engines:
        engine.step(torch.rand(3, SIZE, SIZE))
    frames = [engine.begin(torch.rand(3, SIZE, SIZE)) for engine in engines]
    engines[1].update_params(width=48, height=48)
    errors = advance_batch(engines, frames)
    assert errors[0] is None and errors[2] is None and "size changed" in str(errors[1])
    for index in (0, 2):
        assert engines[index].finish(frames[index]).images.shape == (3, SIZE, SIZE)
