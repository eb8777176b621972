"""The demo ControlNet: a short training run writes a ControlNet that fits the demo UNet, the committed one
loads and is inert at conditioning scale 0, runs are seeded, and the offline reference is the engine's output."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel

pytest.importorskip("skimage", reason="the demo model's training images come from scikit-image (extra `train`)")

from engine import LoadConfig, load_bundle  # noqa: E402
from engine.control import DEMO_CONTROLNET_DIR, canny  # noqa: E402
from engine.models import DEMO_MODEL_DIR  # noqa: E402
from training.demo_controlnet.__main__ import main  # noqa: E402
from training.demo_controlnet.evaluate import reference_outputs  # noqa: E402
from training.demo_controlnet.train import ControlNetSettings, control_images, controlnet_inputs, train  # noqa: E402
from training.demo_model.data import HELD_OUT_IMAGES, load_images, moving_crops  # noqa: E402
from training.demo_model.evaluate import detail, stream_outputs  # noqa: E402

pytestmark = pytest.mark.slow

SHORT = ControlNetSettings(steps=2, batch=2, crops=(32, 48), seed=3)


@pytest.fixture(scope="module")
def demo():
    models = load_bundle(LoadConfig(model=str(DEMO_MODEL_DIR), device="cpu", dtype="float32", backend="eager"))
    models.name = "demo"
    return models


@pytest.fixture(scope="module")
def frames():
    return moving_crops(load_images(HELD_OUT_IMAGES[:1])[HELD_OUT_IMAGES[0]], 2, 64)


def _unet_inputs(seed: int = 0, size: int = 64):
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn((1, 4, size // 8, size // 8), generator=generator)
    text = torch.randn((1, 77, 64), generator=generator)
    return x_t, torch.tensor([359]), text


def _unet(models, x_t, timesteps, text, **residuals) -> torch.Tensor:
    with torch.no_grad():
        return models.unet(x_t, timesteps, encoder_hidden_states=text, return_dict=False, **residuals)[0]


def _residuals(controlnet, x_t, timesteps, text, frame, scale) -> dict:
    with torch.no_grad():
        return controlnet_inputs(controlnet, x_t, timesteps, text, canny(frame)[None], scale)


def test_short_run_writes_a_controlnet_whose_residuals_fit_the_demo_unet(tmp_path, demo, frames):
    record = train(SHORT, tmp_path / "cn")
    assert json.loads((tmp_path / "cn" / "training.json").read_text())["settings"]["steps"] == 2
    assert np.isfinite(record["latent_mse"]) and np.isfinite(record["latent_mse_demo_alone"])
    controlnet = ControlNetModel.from_pretrained(tmp_path / "cn")
    assert controlnet.config.conditioning_channels == 3
    x_t, timesteps, text = _unet_inputs()
    residuals = _residuals(controlnet, x_t, timesteps, text, frames[0], 1.0)
    # One residual per skip connection of the demo UNet (channels 32/64/64, one layer per block): conv_in, then
    # each block's resnet and downsampler; the mid residual matches the mid block's output.
    skips = [(1, 32, 8, 8), (1, 32, 8, 8), (1, 32, 4, 4), (1, 64, 4, 4), (1, 64, 2, 2), (1, 64, 2, 2)]
    assert [tuple(r.shape) for r in residuals["down_block_additional_residuals"]] == skips
    assert tuple(residuals["mid_block_additional_residual"].shape) == (1, 64, 2, 2)
    plain, controlled = _unet(demo, x_t, timesteps, text), _unet(demo, x_t, timesteps, text, **residuals)
    assert controlled.shape == plain.shape and torch.isfinite(controlled).all()
    assert not torch.equal(controlled, plain)  # two optimiser steps moved the zero-initialised outputs


def test_committed_controlnet_loads_and_is_inert_at_scale_zero(demo, frames):
    files = sorted(path.name for path in DEMO_CONTROLNET_DIR.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors", "training.json"]
    assert sum(path.stat().st_size for path in DEMO_CONTROLNET_DIR.iterdir()) < 5e6
    controlnet = ControlNetModel.from_pretrained(DEMO_CONTROLNET_DIR)
    assert list(controlnet.config.block_out_channels) == list(demo.unet.config.block_out_channels)
    x_t, timesteps, text = _unet_inputs(1)
    plain = _unet(demo, x_t, timesteps, text)
    for scale in (0.0, 1.0):
        residuals = _residuals(controlnet, x_t, timesteps, text, frames[0], scale)
        # Exactly equal at scale 0 (every residual is zero); at scale 1 the trained ControlNet changes the output.
        assert torch.equal(_unet(demo, x_t, timesteps, text, **residuals), plain) == (scale == 0.0)


def test_seeded_runs_are_identical_and_seeds_differ(tmp_path):
    train(SHORT, tmp_path / "a")
    train(SHORT, tmp_path / "b")
    train(ControlNetSettings(steps=2, batch=2, crops=(32, 48), seed=4), tmp_path / "c")
    a, b, c = (ControlNetModel.from_pretrained(tmp_path / name).state_dict() for name in "abc")
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a)


def test_command_trains_with_its_flags(tmp_path):
    main(["--out", str(tmp_path / "cn"), "--steps", "1", "--batch", "2", "--crop", "32", "40", "--seed", "5",
          "--lr", "0.002", "--scale", "0.5", "--threads", str(torch.get_num_threads())])
    settings = json.loads((tmp_path / "cn" / "training.json").read_text())["settings"]
    assert (settings["steps"], settings["batch"], settings["crops"], settings["seed"], settings["learning_rate"],
            settings["conditioning_scale"]) == (1, 2, [32, 40], 5, 0.002, 0.5)


def test_reference_is_the_engine_output_and_scale_zero_is_no_controlnet(demo, frames):
    engine = stream_outputs(demo, frames, "sepia photo")
    reference = reference_outputs(demo, frames, "sepia photo")
    # The same computation; the engine batches its two slots and serves cached cross-attention K/V, so a few
    # pixels may round the other way.
    for a, b in zip(engine, reference, strict=True):
        assert np.abs(a.astype(int) - b).max() <= 1 and (a != b).mean() < 0.01
    controlnet = ControlNetModel.from_pretrained(DEMO_CONTROLNET_DIR)
    inert = reference_outputs(demo, frames, "sepia photo", controlnet, conditioning_scale=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(reference, inert, strict=True))


def test_control_images_are_canny_of_each_frame(frames):
    batch = control_images(frames, 50, 150)
    assert batch.shape == (2, 3, 64, 64)
    assert all(torch.equal(batch[i], canny(frame, 50, 150)) for i, frame in enumerate(frames))


def test_detail_is_lower_for_a_blurred_image(frames):
    frame = frames[0]
    assert detail(cv2.GaussianBlur(frame, (0, 0), 2)) < 0.7 * detail(frame)
    assert detail(np.full_like(frame, 90)) == 0


def test_the_engine_serving_the_demo_controlnet_is_the_evaluated_reference(frames):
    """The evaluation's figures are the engine's: `--model demo --controlnet demo` computes what
    `reference_outputs` scores with the ControlNet (sequential steps here, which the stream batch equals)."""
    from engine import Engine, StreamConfig, StreamEngine
    from engine.codec import rgb_to_tensor, tensor_to_rgb

    engine = Engine.load(LoadConfig(model="demo", controlnet="demo", device="cpu", dtype="float32", backend="eager"))
    reference = reference_outputs(engine.models, frames, "pencil sketch", engine.models.controlnet, 1.0)
    stream = StreamEngine(engine, StreamConfig(width=64, height=64, prompt="pencil sketch", similarity_filter=False,
                                               stream_batch=False))
    for frame, expected in zip(frames, reference, strict=True):
        assert np.array_equal(tensor_to_rgb(stream(rgb_to_tensor(frame))), expected)
