"""The committed `demo` model: it loads by name, streams through the engine and follows its prompt."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.clips import synthetic_clip
from engine import Engine, LoadConfig, StreamConfig, StreamEngine, load_models
from engine.codec import rgb_to_tensor, tensor_to_rgb
from engine.models import DEMO_MODEL_DIR, ModelLoadError
from training.demo_model.styles import stylize


@pytest.fixture(scope="module")
def demo_models():
    return load_models("demo")


@pytest.fixture(scope="module")
def demo_engine(demo_models):
    return Engine.prepare(demo_models, LoadConfig(model="demo", backend="eager"))


def _stream(engine: Engine, frame: np.ndarray, prompt: str, frames: int = 2) -> np.ndarray:
    size = frame.shape[0]
    config = StreamConfig(width=size, height=size, prompt=prompt, similarity_filter=False)
    engine = StreamEngine(engine, config)
    output = None
    for _ in range(frames):
        output = tensor_to_rgb(engine(rgb_to_tensor(frame)))
    return output


def _frame(size: int = 128) -> np.ndarray:
    return synthetic_clip("static", 1, size, size, seed=3)[0]


def test_demo_loads_from_the_committed_folder(demo_models):
    assert (DEMO_MODEL_DIR / "vae_tiny" / "config.json").is_file()
    assert demo_models.name == "demo"
    assert type(demo_models.vae).__name__ == "AutoencoderTiny"
    assert sum(p.numel() for p in demo_models.unet.parameters()) < 5_000_000


def test_demo_outputs_follow_the_prompt(demo_engine):
    frame = _frame()
    sketch = _stream(demo_engine, frame, "pencil sketch").astype(np.float32)
    thermal = _stream(demo_engine, frame, "thermal camera").astype(np.float32)
    assert sketch.shape == thermal.shape == frame.shape
    assert np.abs(sketch - thermal).mean() > 60  # of 255


@pytest.mark.parametrize("style", ["pencil sketch", "neon edges", "sepia photo", "thermal camera"])
def test_demo_output_is_closer_to_the_filter_than_the_input_is(demo_engine, style):
    frame = _frame()
    target = stylize(frame, style).astype(np.float32)
    output = _stream(demo_engine, frame, style).astype(np.float32)
    assert np.abs(output - target).mean() < 0.85 * np.abs(frame.astype(np.float32) - target).mean()


@pytest.mark.parametrize("prompt", ["a cat, 4k", ""])
def test_prompts_naming_no_style_fall_back_to_photo(demo_engine, prompt):
    frame = _frame()
    photo = _stream(demo_engine, frame, "photo").astype(np.float32)
    other = _stream(demo_engine, frame, prompt).astype(np.float32)
    thermal = _stream(demo_engine, frame, "thermal camera").astype(np.float32)
    assert np.abs(other - photo).mean() < 8
    assert np.abs(other - thermal).mean() > 30


def test_missing_demo_folder_is_a_model_load_error(monkeypatch, tmp_path):
    monkeypatch.setattr("engine.models.DEMO_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match=r"python -m training\.demo_model"):
        load_models("demo")
