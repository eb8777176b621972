"""The `demo` model's styles: classical filters and the prompt phrases that name them."""

from __future__ import annotations

import random

import numpy as np
import pytest

from benchmarks.clips import synthetic_clip
from training.demo_model.styles import FALLBACK_STYLE, STYLES, sample_prompt, style_of_prompt, stylize

pytestmark = pytest.mark.slow


def _frame(size: int = 128) -> np.ndarray:
    return synthetic_clip("static", 1, size, size, seed=3)[0]


@pytest.mark.parametrize("style", list(STYLES))
def test_every_style_keeps_shape_and_type(style):
    frame = _frame(64)
    out = stylize(frame, style)
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert (np.array_equal(out, frame)) == (style == FALLBACK_STYLE)


def test_prompts_name_their_style_and_unknown_prompts_fall_back():
    rng = random.Random(0)
    for style in STYLES:
        for _ in range(20):
            assert style_of_prompt(sample_prompt(style, rng)) == style
    assert style_of_prompt("Pencil Sketch of a cat") == "pencil sketch"
    assert style_of_prompt("xyzzy") == FALLBACK_STYLE
