"""Temporal steadiness mechanisms (`StreamConfig.temporal`): off is today's stream bit for bit; each mechanism
starts over on a cut, a prompt change and `reset`, stays per stream, and refuses what it cannot run with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.clips import tensor_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.batching import batch_key, step_batch
from engine.config import TemporalSettings
from engine.temporal import AttentionBank, feedback_weight, input_motion

SIZE = 32
MODES = ("feedback", "bank", "flow")


def config(**changes) -> StreamConfig:
    """A small stream without the similarity filter; `changes` by their flat (wire) names."""
    return StreamConfig(width=SIZE, height=SIZE, similarity_filter=False).updated(**changes)


def make(engine: Engine, **changes) -> StreamEngine:
    return StreamEngine(engine, config(**changes))


def run(stream: StreamEngine, frames) -> list[torch.Tensor]:
    return [stream(frame) for frame in frames]


@pytest.fixture(scope="module")
def pan():
    return tensor_clip("slow_pan", 8, SIZE, SIZE)


@pytest.fixture(scope="module")
def cut():
    return tensor_clip("hard_cut", 8, SIZE, SIZE)


def test_off_is_todays_stream_bit_for_bit_whatever_the_tunables(tiny_engine, pan):
    reference = run(StreamEngine(tiny_engine, StreamConfig(width=SIZE, height=SIZE, similarity_filter=False)), pan)
    tuned = run(make(tiny_engine, temporal="off", temporal_strength=0.9, temporal_bank_size=5), pan)
    assert all(torch.equal(a, b) for a, b in zip(reference, tuned, strict=True))


@pytest.mark.parametrize("mode", MODES)
def test_each_mechanism_changes_a_moving_stream_but_not_its_first_frame(tiny_engine, pan, mode):
    off = run(make(tiny_engine), pan)
    on = run(make(tiny_engine, temporal=mode, temporal_strength=0.6, temporal_feedback_strength=0.6,
                   temporal_injection_threshold=0.5), pan)
    assert torch.equal(on[0], off[0])  # nothing earlier to carry
    assert any(not torch.equal(a, b) for a, b in zip(on[2:], off[2:], strict=True))
    assert all(torch.isfinite(frame).all() and frame.shape == (3, SIZE, SIZE) for frame in on)


@pytest.mark.parametrize("mode", ("feedback", "flow"))
def test_a_cut_carries_nothing_of_the_old_scene(tiny_engine, cut, mode):
    """One denoising step, so a frame's output depends on its own latent only: on the cut frame the mechanism
    must start over and give exactly what the stream without it gives."""
    steps = {"t_index_list": (40,)}
    off = run(make(tiny_engine, **steps), cut)
    on = run(make(tiny_engine, temporal=mode, temporal_strength=0.9, temporal_feedback_strength=0.9, **steps), cut)
    at_cut = len(cut) // 2
    assert not torch.equal(on[at_cut - 1], off[at_cut - 1])
    assert torch.equal(on[at_cut], off[at_cut])


@pytest.mark.parametrize("mode", MODES)
def test_a_prompt_change_and_reset_start_over(tiny_engine, pan, mode):
    strengths = {"temporal_strength": 0.6, "temporal_feedback_strength": 0.6}
    stream = make(tiny_engine, temporal=mode, **strengths)
    run(stream, pan[:4])
    stream.update_prompt("a different prompt")
    fresh = make(tiny_engine, temporal=mode, prompt="a different prompt", **strengths)
    # After a prompt change the stream batch still holds earlier frames, but the mechanism keeps nothing.
    assert stream.temporal._previous_latents is None and stream.temporal._previous_output is None
    stream.reset()
    assert all(torch.equal(a, b) for a, b in zip(run(stream, pan[:3]), run(fresh, pan[:3]), strict=True))


def test_mode_and_tunables_are_hot(tiny_engine, pan):
    stream = make(tiny_engine)
    stream(pan[0])
    stream.update_params(temporal="flow", temporal_strength=0.7)
    assert stream.temporal.mode == "flow" and stream.temporal.settings.strength == 0.7
    stream.update_params(temporal_strength=0.2)
    assert stream.temporal.settings.strength == 0.2
    with pytest.raises(ValueError, match="temporal_strength"):
        stream.update_params(temporal_strength=1.5)
    with pytest.raises(ValueError, match="temporal"):
        stream.update_params(temporal="sometimes")
    assert stream.config.temporal == "flow"


def test_a_size_change_reprepares_the_mechanism(tiny_engine):
    stream = make(tiny_engine, temporal="flow")
    run(stream, tensor_clip("slow_pan", 3, SIZE, SIZE))
    stream.update_params(width=48, height=48)
    outputs = run(stream, tensor_clip("slow_pan", 3, 48, 48))
    assert all(frame.shape == (3, 48, 48) for frame in outputs)


def test_with_the_similarity_filter_a_skipped_frame_repeats_the_blended_output(tiny_engine):
    stream = make(tiny_engine, temporal="flow", similarity_filter=True, similarity_threshold=0.9)
    still = tensor_clip("static", 4, SIZE, SIZE)
    outputs = run(stream, still)
    assert stream.frames_skipped > 0 and torch.equal(outputs[-1], outputs[-2])


@pytest.mark.parametrize("mode", ("feedback", "flow"))
def test_batched_sessions_equal_each_session_alone(tiny_engine, pan, mode):
    alone = [run(make(tiny_engine, temporal=mode, prompt=f"session {index}"), pan) for index in range(2)]
    engines = [make(tiny_engine, temporal=mode, prompt=f"session {index}") for index in range(2)]
    assert batch_key(engines[0]) is not None and batch_key(engines[0]) == batch_key(engines[1])
    batched = [step_batch(engines, [frame, frame]) for frame in pan]
    for index in range(2):
        for step, expected in zip(batched, alone[index], strict=True):
            assert (step[index].images - expected).abs().max().item() < 1e-5


def test_a_bank_stream_runs_alone_and_keeps_its_own_bank(tiny_engine, pan):
    first, second = make(tiny_engine, temporal="bank"), make(tiny_engine, temporal="bank")
    assert batch_key(first) is None
    run(first, pan[:3])
    assert first.temporal.bank._frames and not second.temporal.bank._frames


def test_the_bank_is_bounded(tiny_engine, pan):
    stream = make(tiny_engine, temporal="bank", temporal_bank_size=2)
    run(stream, pan)
    frames = stream.temporal.bank._frames
    assert frames and all(len(layer) <= 2 for layer in frames.values())


def test_extended_attention_over_a_copy_of_the_frame_itself_changes_nothing(tiny_engine):
    """Attending to keys and values twice is attending to them once (softmax weights split evenly): a bank
    holding the current frame's own K/V, with injection off, must leave the UNet's output as it was."""
    from engine.prompt import Conditioning

    stream = make(tiny_engine)
    conditioning: Conditioning = next(iter(stream._prompt.layouts.values()))
    latents = torch.randn(conditioning.encoder_hidden_states.shape[0], 4, SIZE // 8, SIZE // 8,
                          generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([699, 299])[: latents.shape[0]]
    plain = stream.runner.unet(latents, timesteps, conditioning)
    bank = AttentionBank(TemporalSettings(injection_strength=0.0))
    banked = dataclass_replace(conditioning, bank)
    stream.runner.unet(latents, timesteps, banked)  # records this frame's K/V
    bank.commit()
    again = stream.runner.unet(latents, timesteps, banked)
    assert bank._frames
    assert (again - plain).abs().max().item() < 1e-5


def dataclass_replace(conditioning, bank):
    import dataclasses

    return dataclasses.replace(conditioning, temporal_bank=bank)


def test_a_bank_needs_a_unet_backend_that_takes_it_and_no_skip_policy(tiny_models):
    from engine.backends.compiled import TorchCompileRunner

    engine = Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager"))
    # ONNX Runtime and TensorRT take the bank as graph inputs (tests/engine/backends/test_backend_bank.py).
    with pytest.raises(ValueError, match="eager, onnxruntime or tensorrt"):
        StreamEngine(engine.with_runner(TorchCompileRunner(tiny_models)), config(temporal="bank"))
    with pytest.raises(ValueError, match="skip policy"):
        StreamEngine(engine, config(temporal="bank", skip_policy="rehash"))
    with pytest.raises(ValueError, match="frame_buffer_size"):
        StreamEngine(engine, config(temporal="flow", frame_buffer_size=2))


def test_flow_runs_on_a_compiled_backend(tiny_models, tmp_path, pan):
    from engine.backends.onnxruntime import OnnxRuntimeRunner

    engine = Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager"))
    runner = OnnxRuntimeRunner(tiny_models, "self", tmp_path, exporter="torchscript")
    compiled = run(StreamEngine(engine.with_runner(runner), config(temporal="flow")), pan[:4])
    eager = run(StreamEngine(engine, config(temporal="flow")), pan[:4])
    assert all((a - b).abs().max().item() < 1e-3 for a, b in zip(compiled, eager, strict=True))


# ---------------------------------------------------------------- the pure pieces


def test_feedback_weight_falls_where_the_input_moves():
    previous = torch.ones(1, 4, 4, 4)
    current = previous.clone()
    current[..., :2] += 1.0  # the left half moved
    weight = feedback_weight(current, previous, strength=0.5, motion_scale=0.05)
    assert torch.allclose(weight[..., 2:], torch.tensor(0.5)) and (weight[..., :2] < 1e-6).all()


def test_input_motion_follows_a_shift_and_calls_a_new_scene_a_cut():
    rng = np.random.default_rng(0)
    scene = (rng.random((48, 80, 3)) * 255).astype(np.float32)
    scene = np.asarray([[scene[y // 4, x // 4] for x in range(80)] for y in range(48)], np.float32)
    previous, current = scene[:, :64], scene[:, 2:66]  # the camera moved 2 px right
    motion = input_motion(previous, current, 0.3, torch.device("cpu"), torch.float32)
    assert not motion.cut and motion.mask.mean().item() > 0.5
    other = (rng.random((48, 64, 3)) * 255).astype(np.float32)
    assert input_motion(previous, other, 0.3, torch.device("cpu"), torch.float32).cut
