"""`engine.train_demo` runs end to end for a couple of tiny steps and writes a loadable model folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("skimage", reason="the demo model's training images come from scikit-image (extra `train`)")

from engine import EngineConfig, StreamEngine, load_models  # noqa: E402
from engine.codec import rgb_to_tensor  # noqa: E402
from engine.train_demo import TrainSettings, build_demo_bundle, train  # noqa: E402


def test_tiny_training_run_saves_a_model_the_engine_streams(tmp_path):
    settings = TrainSettings(vae_steps=2, unet_steps=2, vae_batch=2, vae_crop=32, unet_batch=2, unet_crop=32, seed=5)
    record = train(settings, tmp_path / "demo")
    assert np.isfinite(record["vae_l1"]) and np.isfinite(record["stylizer_latent_mse"])
    assert json.loads((tmp_path / "demo" / "training.json").read_text())["runs"][-1]["settings"]["unet_steps"] == 2

    trained = load_models(str(tmp_path / "demo"))
    untrained = build_demo_bundle(seed=5)
    changed = [not torch.equal(a, b) for a, b in zip(trained.unet.parameters(), untrained.unet.parameters(),
                                                     strict=True)]
    assert any(changed)

    engine = StreamEngine(trained, EngineConfig(width=64, height=64, prompt="sepia photo"))
    output = engine(rgb_to_tensor(np.full((64, 64, 3), 128, dtype=np.uint8)))
    assert output.shape == (3, 64, 64) and torch.isfinite(output).all()
