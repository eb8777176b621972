"""Stochastic similarity filter: its probability, its streak limit, and that skips do not advance state."""

from __future__ import annotations

import pytest
import torch

from engine import StreamConfig, StreamEngine
from engine.similarity import SimilarityFilter, frame_cosine, skip_probability


@pytest.mark.parametrize("cosine,expected", [(1.0, 1.0), (0.99, 0.5), (0.98, 0.0), (0.5, 0.0), (0.995, 0.75)])
def test_skip_probability_formula(cosine, expected):
    assert skip_probability(cosine, 0.98) == pytest.approx(expected)


def test_identical_frames_skip_up_to_the_streak_limit():
    frame = torch.rand(3, 16, 16) * 2 - 1
    filter_ = SimilarityFilter(threshold=0.98, max_skip_frames=3)
    decisions = [filter_.should_skip(frame) for _ in range(9)]
    assert decisions == [False, True, True, True, False, True, True, True, False]


def test_different_frames_are_never_skipped():
    generator = torch.Generator().manual_seed(0)
    filter_ = SimilarityFilter(threshold=0.98, max_skip_frames=10)
    frames = [torch.rand(3, 16, 16, generator=generator) * 2 - 1 for _ in range(20)]
    assert frame_cosine(frames[0], frames[1]) < 0.98
    assert not any(filter_.should_skip(frame) for frame in frames)


def test_skip_rate_follows_the_probability():
    base = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    # Mix until the cosine is about 0.99 (skip probability about 0.5).
    for weight in torch.linspace(0.01, 0.5, 200):
        near = base + weight * noise
        if frame_cosine(base, near) <= 0.99:
            break
    probability = skip_probability(frame_cosine(near, base), 0.98)
    assert 0.3 < probability < 0.7
    skips = 0
    for trial in range(400):
        filter_ = SimilarityFilter(threshold=0.98, max_skip_frames=10, seed=trial)
        filter_.should_skip(base)
        skips += filter_.should_skip(near)
    # 400 Bernoulli draws: the standard error of the rate is about 0.025.
    assert abs(skips / 400 - probability) < 0.1


def test_skipped_frame_returns_previous_output_and_does_not_advance_state(tiny_engine):
    config = StreamConfig(width=32, height=32, t_index_list=(32, 45), cfg_type="none", max_skip_frames=2)
    filtered = StreamEngine(tiny_engine, config)
    unfiltered = StreamEngine(tiny_engine, config.replace(similarity_filter=False))
    frame = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4))
    other = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(5))
    first = filtered.step(frame)
    assert not first.skipped
    repeats = [filtered.step(frame) for _ in range(2)]
    assert all(result.skipped and torch.equal(result.images, first.images) for result in repeats)
    assert filtered.frames_skipped == 2
    # The skipped frames did not enter the buffer: the next frame matches a stream that never saw them.
    unfiltered(frame)
    assert torch.equal(filtered(other), unfiltered(other))
