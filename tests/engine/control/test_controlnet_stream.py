"""ControlNet in the stream batch: each slot keeps its own control image, exactly as sequential denoising does."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine import Engine, LoadConfig, StreamConfig, load_models
from engine.backends import EagerRunner
from engine.batching import batch_key, step_batch
from engine.config import CFG_TYPES
from engine.control import canny
from engine.controlnet import random_controlnet
from engine.models import ModelLoadError
from engine.stream import StreamEngine

SIZE = 32


class RecordingRunner(EagerRunner):
    """The eager runner, keeping each ControlNet call's residuals, the residuals each UNet call got, and the
    decoded latents."""

    def __init__(self, models):
        super().__init__(models)
        self.raw: list = []
        self.applied: list = []
        self.decoded: list[torch.Tensor] = []

    def controlnet(self, latents, timesteps, conditioning, embeddings):
        residuals = super().controlnet(latents, timesteps, conditioning, embeddings)
        self.raw.append(residuals)
        return residuals

    def unet(self, latents, timesteps, conditioning):
        self.applied.append(conditioning.control)
        return super().unet(latents, timesteps, conditioning)

    def decode(self, latents):
        self.decoded.append(latents.clone())
        return super().decode(latents)


def make_config(**changes) -> StreamConfig:
    base = dict(width=SIZE, height=SIZE, similarity_filter=False, guidance_scale=1.5, delta=0.8,
                canny_low_threshold=50, canny_high_threshold=120)
    return StreamConfig(**{**base, **changes})


def moving_frames(count: int, frames_per_call: int = 1, seed: int = 0) -> list[torch.Tensor]:
    """Random blocks: sharp edges for canny, different in every frame."""
    generator = torch.Generator().manual_seed(seed)
    blocks = [torch.rand(frames_per_call, 3, SIZE // 4, SIZE // 4, generator=generator) for _ in range(count)]
    return [torch.nn.functional.interpolate(block, scale_factor=4, mode="nearest") for block in blocks]


@pytest.mark.parametrize("frame_buffer_size", [1, 2])
@pytest.mark.parametrize("t_index_list", [(45,), (32, 45), (0, 16, 32, 45)])
@pytest.mark.parametrize("cfg_type", CFG_TYPES)
def test_stream_batch_equals_sequential_denoising(tiny_controlnet_engine, with_runner, cfg_type, t_index_list,
                                                  frame_buffer_size):
    if frame_buffer_size == 2 and len(t_index_list) != 2:
        pytest.skip("f=2 runs at n=2 in every mode (the other n add time, not coverage)")
    models = tiny_controlnet_engine.models
    config = make_config(cfg_type=cfg_type, t_index_list=t_index_list, frame_buffer_size=frame_buffer_size)
    stream = StreamEngine(with_runner(tiny_controlnet_engine, RecordingRunner(models)), config)
    sequential = StreamEngine(with_runner(tiny_controlnet_engine, RecordingRunner(models)),
                              config.replace(stream_batch=False))
    without = StreamEngine(tiny_controlnet_engine, config.replace(stream_batch=False, controlnet_scale=0.0))
    frames = moving_frames(5, frame_buffer_size)
    lag = len(t_index_list) - 1
    expected = [sequential(frame) for frame in frames]
    for index, frame in enumerate(frames):
        reference = max(0, index - lag)
        torch.testing.assert_close(stream(frame), expected[reference], rtol=0, atol=1e-5)
        torch.testing.assert_close(stream.runner.decoded[index], sequential.runner.decoded[reference],
                                   rtol=1e-4, atol=1e-4)
    # The ControlNet changes the output, and the frames differ: matching the right frame is a real check.
    assert (expected[-1] - without(frames[-1])).abs().max() > 1e-3
    assert (sequential.runner.decoded[0] - sequential.runner.decoded[-1]).abs().max() > 1e-2


def test_scale_zero_is_exactly_no_controlnet(tiny_controlnet_engine, tiny_models, tiny_engine):
    assert torch.equal(next(tiny_controlnet_engine.models.unet.parameters()), next(tiny_models.unet.parameters()))
    for cfg_type in ("self", "full"):
        config = make_config(cfg_type=cfg_type, t_index_list=(20, 32, 45))
        zero = StreamEngine(tiny_controlnet_engine, config.replace(controlnet_scale=0.0))
        plain = StreamEngine(tiny_engine, config)
        for frame in moving_frames(4, seed=1):
            assert torch.equal(zero(frame), plain(frame))


def test_a_hot_scale_change_applies_from_the_next_frame(tiny_controlnet_engine, with_runner):
    runner = RecordingRunner(tiny_controlnet_engine.models)
    stream = StreamEngine(with_runner(tiny_controlnet_engine, runner), make_config(t_index_list=(32, 45)))
    frames = moving_frames(4, seed=2)
    stream(frames[0])
    stream(frames[1])
    stream.update_params(controlnet_scale=0.5)
    runner.raw.clear()
    runner.applied.clear()
    stream(frames[2])
    (raw,), (applied,) = runner.raw, runner.applied
    for got, computed in zip(applied.tensors(), raw.tensors(), strict=True):
        assert torch.equal(got, computed * 0.5)
    stream.update_params(controlnet_scale=0.0)
    runner.raw.clear()
    runner.applied.clear()
    stream(frames[3])
    assert runner.raw == [] and runner.applied == [None]  # at 0 the ControlNet does not run


SESSIONS = [
    dict(prompt="a red fox", cfg_type="self", controlnet_scale=1.0),
    dict(prompt="a city at night", cfg_type="self", seed=11, controlnet_scale=0.0),
    dict(prompt="an oil painting", cfg_type="initialize", negative_prompt="blurry", controlnet_scale=1.5),
    dict(prompt="a watercolour", cfg_type="full", negative_prompt="dark", controlnet_scale=0.6,
         canny_low_threshold=10, canny_high_threshold=40),
    dict(prompt="pencil sketch", cfg_type="none", t_index_list=(32, 45), controlnet_scale=0.8),
]


def test_a_session_in_a_batch_equals_the_session_alone(tiny_controlnet_engine, with_runner):
    runner = RecordingRunner(tiny_controlnet_engine.models)
    shared = with_runner(tiny_controlnet_engine, runner)
    base = make_config(t_index_list=(20, 32, 45), seed=3)
    batched = [StreamEngine(shared, base.replace(**changes)) for changes in SESSIONS]
    alone = [StreamEngine(tiny_controlnet_engine, base.replace(**changes)) for changes in SESSIONS]
    assert len({batch_key(engine) for engine in batched}) == 1
    streams = [moving_frames(4, seed=10 + index) for index in range(len(SESSIONS))]
    for step in range(4):
        inputs = [frames[step][0] for frames in streams]
        runner.raw.clear()
        results = step_batch(batched, inputs)
        if step > 0:
            assert len(runner.raw) == 1  # one ControlNet call for every session's rows
        outputs = []
        for engine, result, image in zip(alone, results, inputs, strict=True):
            torch.testing.assert_close(result.images, engine.step(image).images, atol=1e-5, rtol=0)
            outputs.append(result.images)
        for first, second in itertools.combinations(outputs, 2):
            assert (first - second).abs().max() > 1e-2


def test_reuse_recomputes_every_interval_and_when_the_control_image_moves(tiny_controlnet_engine, with_runner):
    runner = RecordingRunner(tiny_controlnet_engine.models)
    still = moving_frames(1, seed=4)[0][0]
    config = make_config(t_index_list=(32, 45), controlnet_reuse_interval=3, controlnet_reuse_threshold=0.5)
    reusing = StreamEngine(with_runner(tiny_controlnet_engine, runner), config)
    assert batch_key(reusing) is None  # its residuals are its own
    calls = []
    for _ in range(7):
        before = len(runner.raw)
        reusing(still)
        calls.append(len(runner.raw) - before)
    # Priming computes its own (never reused); then every third frame computes and the two between reuse.
    assert calls == [2, 0, 0, 1, 0, 0, 1]
    # With threshold 0 a moving control image is recomputed on every frame: exactly the stream without reuse.
    moving = [frame[0] for frame in moving_frames(5, seed=6)]
    strict = StreamEngine(tiny_controlnet_engine, config.replace(controlnet_reuse_threshold=0.0))
    plain = StreamEngine(tiny_controlnet_engine, config.replace(controlnet_reuse_interval=1))
    for frame in moving:
        assert torch.equal(strict(frame), plain(frame))
    # Reuse on a moving input is an approximation: bounded, not exact.
    loose = StreamEngine(tiny_controlnet_engine, config.replace(controlnet_reuse_threshold=1.0))
    plain.reset()
    errors = [float((loose(frame) - plain(frame)).abs().mean()) for frame in moving]
    assert max(errors) < 0.1 and max(errors) > 0


def test_each_session_has_its_own_canny_thresholds_and_can_show_its_control_image(tiny_controlnet_engine):
    frame = moving_frames(1, seed=7)[0][0]
    config = make_config(t_index_list=(45,), show_control=True)
    low = StreamEngine(tiny_controlnet_engine, config.replace(canny_low_threshold=5, canny_high_threshold=20))
    high = StreamEngine(tiny_controlnet_engine, config)
    assert torch.equal(low(frame), canny(frame, 5, 20))
    assert torch.equal(high(frame), canny(frame, 50, 120))
    assert not torch.equal(canny(frame, 5, 20), canny(frame, 50, 120))
    high.update_params(canny_low_threshold=5, canny_high_threshold=20, show_control=False)
    output = high(frame)
    assert output.shape == frame.shape and not torch.equal(output, canny(frame, 5, 20))


def test_the_control_image_follows_its_frame_through_the_buffer(tiny_controlnet_engine):
    """With `show_control`, a stream of n slots outputs the control image of the frame n − 1 frames ago: the one
    whose latents it outputs."""
    stream = StreamEngine(tiny_controlnet_engine, make_config(t_index_list=(20, 32, 45), show_control=True))
    frames = [frame[0] for frame in moving_frames(5, seed=8)]
    outputs = [stream(frame) for frame in frames]
    for index, output in enumerate(outputs):
        assert torch.equal(output, canny(frames[max(0, index - 2)], 50, 120))


def test_a_controlnet_of_another_family_fails_at_load_naming_it(tmp_path, tiny_sdxl_models):
    folder = tmp_path / "sdxl-controlnet"
    random_controlnet(tiny_sdxl_models.unet).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="does not fit this model.*cross_attention_dim"):
        Engine.load(LoadConfig(model="tiny", controlnet=str(folder), backend="eager", device="cpu"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        Engine.load(LoadConfig(model="tiny", controlnet=str(tmp_path), backend="eager", device="cpu"))


def test_a_prepared_engine_must_name_the_controlnet_its_models_have(tiny_controlnet_engine, tiny_models):
    with pytest.raises(ValueError, match="`controlnet`"):
        Engine.prepare(tiny_models, LoadConfig(model="tiny", controlnet="random", backend="eager"))
    with pytest.raises(ValueError, match="skip_policy"):
        StreamEngine(tiny_controlnet_engine, make_config(skip_policy="rehash"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_stays_close_to_float32(tiny_controlnet_dir, tiny_controlnet_engine, dtype):
    models = load_models("tiny")
    models.controlnet = tiny_controlnet_engine.models.controlnet.__class__.from_pretrained(tiny_controlnet_dir)
    half = Engine.prepare(models.to(torch.device("cpu"), dtype),
                          LoadConfig(model="tiny", controlnet=str(tiny_controlnet_dir), backend="eager"))
    config = make_config(t_index_list=(32, 45), cfg_type="full")
    reference, stream = StreamEngine(tiny_controlnet_engine, config), StreamEngine(half, config)
    for frame in moving_frames(3, seed=9):
        got, want = stream(frame[0]), reference(frame[0])
        assert got.dtype == dtype and torch.isfinite(got).all()
        # 6 ULPs of the half type on [0, 1] images, as tests/engine/test_half_precision.py bounds the engine.
        assert float((got.float() - want).abs().mean()) < 6 * torch.finfo(dtype).eps


@pytest.mark.parametrize("channel_order", ["rgb", "bgr"])
def test_the_embedded_controlnet_is_diffusers_own_forward(tiny_controlnet_engine, channel_order):
    """The engine embeds each frame's control image once and runs the ControlNet on the embedding
    (`controlnet_body`); that is exactly `ControlNetModel.forward` on the image, for either channel order, and the
    shared ControlNet is left as it was."""
    from engine.controlnet import controlnet_body, embed_control, run_controlnet_body

    controlnet = random_controlnet(tiny_controlnet_engine.models.unet, seed=3).eval()
    controlnet.register_to_config(controlnet_conditioning_channel_order=channel_order)
    generator = torch.Generator().manual_seed(0)
    latents, images = torch.randn(3, 4, 8, 8, generator=generator), torch.rand(3, 3, 64, 64, generator=generator)
    timesteps, text = torch.tensor([999, 500, 20]), torch.randn(3, 77, 32, generator=generator)
    with torch.no_grad():
        down, mid = controlnet(latents, timesteps, encoder_hidden_states=text, controlnet_cond=images,
                               return_dict=False)
        residuals = run_controlnet_body(controlnet, latents, timesteps, text, embed_control(controlnet, images))
    for got, want in zip(residuals.tensors(), [*down, mid], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not isinstance(controlnet.controlnet_cond_embedding, torch.nn.Identity)
    assert controlnet_body(controlnet) is controlnet_body(controlnet)
    assert isinstance(controlnet_body(controlnet).controlnet_cond_embedding, torch.nn.Identity)
