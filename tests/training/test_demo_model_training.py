"""`python -m training.demo_model` trains end to end for a couple of tiny steps and writes a loadable model folder."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="the demo model's training images come from scikit-image (extra `train`)")

from engine import Engine, LoadConfig, StreamConfig, StreamEngine, load_models  # noqa: E402
from engine.codec import rgb_to_tensor  # noqa: E402
from training.demo_model.__main__ import main  # noqa: E402
from training.demo_model.data import TRAIN_IMAGES, CropSampler, load_images  # noqa: E402
from training.demo_model.styles import FALLBACK_STYLE, style_of_prompt  # noqa: E402
from training.demo_model.train import TrainSettings, _gradient_l1, build_demo_bundle, style_batch, train  # noqa: E402

pytestmark = pytest.mark.slow


def test_tiny_training_run_saves_a_model_the_engine_streams(tmp_path):
    settings = TrainSettings(vae_steps=2, unet_steps=2, vae_batch=2, vae_crop=32, unet_batch=2, unet_crop=32,
                             latent_scale=2.5, seed=5)
    record = train(settings, tmp_path / "demo")
    assert np.isfinite(record["vae_l1"]) and np.isfinite(record["stylizer_latent_mse"])
    assert json.loads((tmp_path / "demo" / "training.json").read_text())["runs"][-1]["settings"]["unet_steps"] == 2

    trained = load_models(str(tmp_path / "demo"))
    # The engine scales latents by the saved VAE's factor, the signal-to-noise knob the stylizer was trained at.
    assert trained.vae.config.scaling_factor == 2.5
    untrained = build_demo_bundle(seed=5)
    changed = [not torch.equal(a, b) for a, b in zip(trained.unet.parameters(), untrained.unet.parameters(),
                                                     strict=True)]
    assert any(changed)

    engine = StreamEngine(Engine.prepare(trained, LoadConfig(model=str(tmp_path / "demo"), backend="eager")),
                          StreamConfig(width=64, height=64, prompt="sepia photo"))
    output = engine(rgb_to_tensor(np.full((64, 64, 3), 128, dtype=np.uint8)))
    assert output.shape == (3, 64, 64) and torch.isfinite(output).all()


def test_gradient_loss_sees_blur_that_leaves_the_mean_unchanged():
    image = torch.zeros(1, 3, 16, 16)
    image[..., ::2, :] = 1  # stripes
    flat = torch.full_like(image, 0.5)  # same mean, no edges
    assert _gradient_l1(image, image) == 0
    assert _gradient_l1(flat, image) > 0.5


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_fallback_share_sets_how_many_crops_keep_their_input(share):
    sampler = CropSampler(load_images(TRAIN_IMAGES[:2]), 32, seed=0)
    inputs, targets, prompts = style_batch(sampler, 12, random.Random(0), fallback_share=share)
    unchanged = [np.array_equal(a, b) for a, b in zip(inputs, targets, strict=True)]
    assert all(unchanged) == (share == 1.0) and any(unchanged) == (share == 1.0)
    assert all((style_of_prompt(p) == FALLBACK_STYLE) == (share == 1.0) for p in prompts)


def test_command_trains_with_its_flags(tmp_path):
    main(["--out", str(tmp_path / "demo"), "--steps", "2", "--vae-steps", "1", "--crop", "32", "--batch", "2",
          "--seed", "3", "--threads", str(torch.get_num_threads())])
    settings = json.loads((tmp_path / "demo" / "training.json").read_text())["runs"][-1]["settings"]
    assert (settings["unet_steps"], settings["vae_steps"], settings["unet_crop"], settings["vae_crop"],
            settings["unet_batch"], settings["seed"]) == (2, 1, 32, 32, 2, 3)
    assert load_models(str(tmp_path / "demo")).vae.config.scaling_factor == TrainSettings().latent_scale
