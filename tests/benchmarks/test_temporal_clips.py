"""The temporal benchmark's photo clips: their sizes, their motion and their determinism."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import temporal_clips as tc
from benchmarks.temporal_metrics import consecutive_l1, pair_motion

WIDTH, HEIGHT = 96, 64


@pytest.mark.parametrize("name", list(tc.CLIPS))
def test_every_clip_has_the_frames_asked_for_and_is_deterministic(name):
    clip = tc.make_clip(name, 6, WIDTH, HEIGHT)
    assert clip.name == name and clip.description
    assert len(clip.frames) == 6
    assert all(frame.shape == (HEIGHT, WIDTH, 3) and frame.dtype == np.uint8 for frame in clip.frames)
    again = tc.make_clip(name, 6, WIDTH, HEIGHT)
    assert all((a == b).all() for a, b in zip(clip.frames, again.frames, strict=True))
    assert consecutive_l1(clip.frames) > 0  # no clip is frozen: even the still one has fresh noise


def test_still_clip_has_fresh_sensor_noise_of_the_stated_sigma():
    frames = [frame.astype(np.float64) for frame in tc.make_clip("still_noise", 4, 128, 128).frames]
    # Two independent draws of σ each differ by σ·√2 (rounding to integers adds 1/12 of a level² per frame).
    spread = np.std(frames[1] - frames[0])
    assert spread == pytest.approx(np.sqrt(2 * (tc.SENSOR_NOISE_SIGMA ** 2 + 1 / 12)), rel=0.1)
    assert np.abs(np.mean(frames, axis=0) - frames[0]).mean() < tc.SENSOR_NOISE_SIGMA


@pytest.mark.parametrize(("name", "speed"), [("pan_1px", 1), ("pan_2px", 2)])
def test_whole_pixel_pans_move_the_picture_exactly(name, speed):
    frames = tc.make_clip(name, 3, WIDTH, HEIGHT).frames
    for before, after in zip(frames[:-1], frames[1:], strict=True):
        assert (after[:, :-speed] == before[:, speed:]).all()


def test_fractional_pan_moves_at_its_speed():
    frames = tc.make_clip("pan_1.5px", 2, 256, 128).frames
    flow = pair_motion(*frames).flow[16:-16, 16:-16]
    assert np.median(flow[..., 0]) == pytest.approx(1.5, abs=0.1)
    assert np.median(flow[..., 1]) == pytest.approx(0, abs=0.1)


def test_zoom_magnifies_about_the_centre():
    frames = tc.make_clip("zoom", 2, 256, 256).frames
    flow = pair_motion(*frames).flow
    # Seen from the next frame a pixel came from 1/1.01 of its distance to the centre: (x - c)(1/1.01 - 1).
    expected = (np.arange(256) + 0.5 - 128) * (1 / (1 + tc.ZOOM_PER_FRAME) - 1)
    measured = np.median(flow[96:160, :, 0], axis=0)
    assert np.abs(measured[32:-32] - expected[32:-32]).max() < 0.2


def test_cut_switches_photographs_halfway():
    clip = tc.make_clip("cut", 10, WIDTH, HEIGHT)
    assert clip.cut == 5
    steps = [consecutive_l1(clip.frames[t:t + 2]) for t in range(9)]
    assert steps[clip.cut - 1] > 3 * max(steps[:clip.cut - 1] + steps[clip.cut:])


def test_fast_clip_moves_far_more_than_the_slow_pan():
    fast, slow = (consecutive_l1(tc.make_clip(name, 4, WIDTH, HEIGHT).frames) for name in ("fast", "pan_1px"))
    assert fast > 2 * slow


def test_swing_turns_back_at_the_end_of_the_picture():
    assert [tc.swing(index, 3, 7) for index in range(6)] == [0, 3, 6, 5, 2, 1]
    assert tc.swing(5, 3, 0) == 0


def test_unknown_clip_and_too_short_clips_are_refused():
    with pytest.raises(ValueError, match="unknown clip"):
        tc.make_clip("earthquake", 4, WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="at least 2 frames"):
        tc.make_clip("pan_1px", 1, WIDTH, HEIGHT)
