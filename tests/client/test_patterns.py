"""The synthetic moving pattern of the live clients."""

from __future__ import annotations

import numpy as np

from client.patterns import draw_disc, moving_pattern


def test_pattern_is_deterministic_rgb_and_moves():
    first = moving_pattern(0, 48, 32)
    assert first.shape == (32, 48, 3) and first.dtype == np.uint8
    assert np.array_equal(first, moving_pattern(0, 48, 32))
    assert not np.array_equal(first, moving_pattern(1, 48, 32))


def test_disc_paints_only_inside_its_radius():
    frame = np.zeros((9, 9, 3), np.uint8)
    draw_disc(frame, 4, 4, 2, (255, 0, 0))
    assert frame[4, 4].tolist() == [255, 0, 0] and frame[4, 6].tolist() == [255, 0, 0]
    assert frame[4, 7].tolist() == [0, 0, 0] and frame[0, 0].tolist() == [0, 0, 0]
    assert int(frame[..., 0].astype(bool).sum()) == 13  # lattice points within radius 2
