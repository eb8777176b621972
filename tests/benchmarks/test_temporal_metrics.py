"""The temporal metrics on synthetic frames with known motion: exact answers where the arithmetic allows,
bounds where an optical-flow estimator is involved."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from benchmarks import temporal_metrics as tm
from engine import motion

SIZE = 96


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB texture (blurred noise, 0-255): detail at every place for the flow to lock on."""
    noise = np.random.default_rng(seed).normal(size=(height, width, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    return (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255


def panned(dx: int, dy: int, frames: int = 2) -> list[np.ndarray]:
    """A camera moving (dx, dy) px per frame over a larger texture: the content moves by (-dx, -dy)."""
    canvas = texture(SIZE + frames * abs(dy) + 1, SIZE + frames * abs(dx) + 1)
    return [canvas[t * dy:t * dy + SIZE, t * dx:t * dx + SIZE] for t in range(frames)]


def constant(value: float, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, np.float32)


# ---------------------------------------------------------------- warp and occlusion, exact

def test_warp_along_a_whole_pixel_flow_is_an_exact_shift():
    image = texture(32, 32)
    flow = np.zeros((32, 32, 2), np.float32)
    flow[..., 0], flow[..., 1] = 2, 1
    # out(p) = image(p + (2, 1)): row y, column x shows image[y + 1, x + 2].
    assert np.allclose(motion.warp(image, flow)[:-1, :-2], image[1:, 2:], atol=1e-3)


def test_occlusion_mask_drops_what_a_consistent_flow_carries_out_of_the_picture():
    flow = np.zeros((16, 20, 2), np.float32)
    flow[..., 0] = 3
    reverse = -flow
    mask = motion.occlusion_mask(flow, reverse)
    # Columns 17-19 would come from x + 3 > 19, outside the frame: uncovered at the border.
    assert mask[:, :17].all() and not mask[:, 17:].any()


def test_occlusion_mask_drops_pixels_whose_round_trip_misses():
    flow = np.zeros((16, 16, 2), np.float32)
    flow[..., 0] = 2
    reverse = -flow
    reverse[4:8, 6:10, 0] = 2  # where these pixels land, the way back points elsewhere (an occluder)
    mask = motion.occlusion_mask(flow, reverse)
    expected = np.ones((16, 16), bool)
    expected[:, 14:] = False  # carried out of the picture
    expected[4:8, 4:8] = False  # x + 2 lands in columns 6-9: a round trip of 4 px, far beyond the tolerance
    assert (mask == expected).all()


def test_round_trip_tolerance_grows_with_the_motion():
    # The tolerance is 0.5 px² plus 1% of the two vectors' squared lengths: a round trip that misses by 0.8 px
    # (0.64 px²) fails at rest and passes at 20 px of motion (tolerance 8.8 px²).
    flow = np.zeros((4, 64, 2), np.float32)
    reverse = np.zeros_like(flow)
    reverse[..., 0] = -0.8
    assert not motion.occlusion_mask(flow, reverse)[:, :60].any()
    flow[..., 0] = 20
    reverse[..., 0] = -20.8
    assert motion.occlusion_mask(flow, reverse)[:, :44].all()


# ---------------------------------------------------------------- flow on real motion, bounded

@pytest.mark.parametrize("method", motion.FLOW_METHODS)
@pytest.mark.parametrize("shift", [(3, 0), (2, 1)])
def test_a_pure_translation_is_found_and_its_input_warps_onto_itself(method, shift):
    frames = panned(*shift)
    motion = tm.pair_motion(*frames, method=method)
    inner = (slice(16, -16), slice(16, -16))
    assert np.median(motion.flow[inner][..., 0]) == pytest.approx(shift[0], abs=0.1)
    assert np.median(motion.flow[inner][..., 1]) == pytest.approx(shift[1], abs=0.1)
    assert motion.mask[inner].mean() > 0.95
    # The two frames differ by several levels per pixel; carried along the flow they agree.
    assert tm.consecutive_l1(frames) > 5
    assert tm.warp_error(frames, [motion]) < 0.5


def test_the_mask_excludes_the_border_a_pan_uncovers():
    frames = panned(3, 0)
    mask = tm.pair_motion(*frames).mask
    assert not mask[:, -3:].any()  # new content entering on the right has no past
    assert mask[8:-8, 8:-8].mean() > 0.95


@pytest.mark.parametrize(("method", "tolerance"), [("dis", 0.0), ("farneback", 0.05)])
def test_identical_frames_score_zero(method, tolerance):
    frames = [texture(SIZE, SIZE)] * 4
    motion = tm.clip_motion(frames, method)
    assert len(motion) == 3 and all(m.mask[8:-8, 8:-8].all() for m in motion)
    # DIS finds exactly no motion; Farneback's polynomial fit leaves a few thousandths of a pixel (0.2 px at
    # worst, near the border), worth about 0.01 levels here.
    assert tm.warp_error(frames, motion) <= tolerance
    assert tm.consecutive_l1(frames) == 0


def test_a_still_output_over_a_moving_input_has_a_large_warp_error():
    inputs = panned(3, 0, frames=4)
    motion = tm.clip_motion(inputs)
    frozen = [inputs[0]] * 4
    # Nothing changes between the output frames, but they fail to follow the input's motion.
    assert tm.consecutive_l1(frozen) == 0
    assert tm.warp_error(frozen, motion) > 0.5 * tm.consecutive_l1(inputs)
    assert tm.warp_error(frozen, motion) > 20 * tm.warp_error(inputs, motion)


def test_flicker_on_a_moving_input_shows_above_the_input_floor():
    inputs = panned(2, 0, frames=5)
    motion = tm.clip_motion(inputs)
    flicker = [frame + (4 if t % 2 else -4) for t, frame in enumerate(inputs)]
    floor = tm.warp_error(inputs, motion)
    # Every pixel flips by 8 levels each frame, on top of the motion the flow explains.
    assert tm.warp_error(flicker, motion) == pytest.approx(8, abs=floor + 0.1)


def test_skipped_pairs_are_left_out():
    frames = [constant(0), constant(0), constant(100), constant(100)]
    motion = [tm.Motion(np.zeros((8, 8, 2), np.float32), np.ones((8, 8), bool))] * 3
    assert tm.warp_error(frames, motion) == pytest.approx(100 / 3)
    assert tm.warp_error(frames, motion, skip={1}) == 0
    assert tm.consecutive_l1(frames, skip={1}) == 0
    with pytest.raises(ValueError, match="no frame pair"):
        tm.consecutive_l1(frames, skip={0, 1, 2})
    with pytest.raises(ValueError, match="one Motion per pair"):
        tm.warp_error(frames, motion[:2])


def test_a_pair_without_trustworthy_flow_is_left_out():
    frames = [constant(0), constant(50), constant(50)]
    motion = [tm.Motion(np.zeros((8, 8, 2), np.float32), np.zeros((8, 8), bool)),
              tm.Motion(np.zeros((8, 8, 2), np.float32), np.ones((8, 8), bool))]
    assert tm.warp_error(frames, motion) == 0
    with pytest.raises(ValueError, match="no pair has a trustworthy flow"):
        tm.warp_error(frames[:2], motion[:1])


def test_unknown_flow_method_is_refused():
    with pytest.raises(ValueError, match="farneback"):
        motion.optical_flow(constant(0), constant(0), "raft")


# ---------------------------------------------------------------- detail and distances

def test_detail_of_a_ramp_is_its_slope():
    ramp = np.repeat(np.tile(np.arange(32, dtype=np.float32) * 3, (32, 1))[..., None], 3, axis=2)
    # Sobel reflects at the border, where the slope reads 0: 30 of 32 columns carry 3 levels per pixel.
    assert tm.gradient_magnitude(ramp) == pytest.approx(3 * 30 / 32)
    assert tm.gradient_magnitude(constant(77)) == 0


def test_detail_scales_with_contrast_and_falls_with_blur():
    image = texture(64, 64)
    assert tm.detail([2 * image]) == pytest.approx(2 * tm.detail([image]), rel=1e-5)
    assert tm.detail([cv2.GaussianBlur(image, (0, 0), 1.5)]) < 0.7 * tm.detail([image])
    assert tm.detail([image, constant(5, 64)]) == pytest.approx(tm.detail([image]) / 2)


def test_mean_l1_averages_over_frames():
    assert tm.mean_l1([constant(10), constant(20)], [constant(10), constant(16)]) == 2
    with pytest.raises(ValueError):
        tm.mean_l1([constant(1)], [])


# ---------------------------------------------------------------- cut_frames

OLD, NEW = 100.0, 200.0


def reference_clip(cut: int = 4, after: int = 6) -> list[np.ndarray]:
    return [constant(OLD)] * cut + [constant(NEW)] * after


def ghosted(weights: list[float], offset: float = 2.0, cut: int = 4) -> list[np.ndarray]:
    """A method that differs from the reference by `offset` everywhere and, after the cut, keeps a ghost of
    the old scene at the given weights."""
    return [constant(OLD + offset)] * cut + [constant(NEW + offset + w * (OLD - NEW)) for w in weights]


def test_cut_bound_is_the_steady_distance_on_the_new_scene_plus_a_tenth_of_the_scene_change():
    # Steady distance 2 once settled; the scenes' reference outputs are 100 apart.
    assert tm.cut_bound(ghosted([0.6, 0.3, 0, 0, 0, 0]), reference_clip(), 4) == pytest.approx(2 + 0.1 * 100)
    assert tm.cut_bound(reference_clip(), reference_clip(), 4) == pytest.approx(10)


def test_ghost_weight_is_the_old_scenes_share_in_the_output():
    weights = tm.ghost_weights(ghosted([0.6, 0.3, 0, 0, 0, 0], offset=0), reference_clip(), 4)
    assert weights == pytest.approx([0.6, 0.3, 0, 0, 0, 0])
    # While the reference still shows the old scene (a stream batch's delay) no weight is asked for.
    late = [constant(OLD)] * 5 + [constant(NEW)] * 5
    assert tm.ghost_weights(late, late, 4)[0] is None


def test_cut_frames_counts_the_frames_a_ghost_stays_visible():
    reference = reference_clip()
    assert tm.cut_frames(reference, reference, 4) == 0
    # Distances 58, 28, 13, 3, 2, 2 against a bound of 12, ghosts 0.58, 0.28, 0.13, 0.03, ...: three frames out.
    assert tm.cut_frames(ghosted([0.6, 0.3, 0.15, 0.05, 0, 0]), reference, 4) == 3
    assert tm.cut_frames(ghosted([0.05, 0, 0, 0, 0, 0]), reference, 4) == 0


def test_cut_frames_waits_until_the_output_stays_recovered():
    reference = reference_clip()
    # Recovered once (0.05), then a ghost again (0.3): recovered only from the fourth frame on.
    assert tm.cut_frames(ghosted([0.6, 0.05, 0.3, 0, 0, 0]), reference, 4) == 3


def test_a_frozen_output_or_a_ghost_that_never_fades_never_recovers():
    assert tm.cut_frames([constant(OLD)] * 10, reference_clip(), 4) == 6
    # A third of the old scene for good: its distance is steady, but the ghost is there.
    assert tm.cut_frames(ghosted([0.3] * 6), reference_clip(), 4) == 6


def test_a_new_steady_distance_on_the_new_scene_is_no_ghost():
    # 2 levels from the reference before the cut, 5 after it (the new scene has more detail to differ on).
    frames = [constant(OLD + 2)] * 4 + [constant(NEW + 5)] * 6
    assert tm.cut_frames(frames, reference_clip(), 4) == 0


def test_a_disturbance_that_is_no_ghost_counts_too():
    # Two frames of a ±50 checkerboard on the new scene: nothing of the old scene in them, yet far from it.
    checker = np.indices((8, 8)).sum(0)[..., None] % 2 * 100.0 - 50
    frames = [constant(OLD)] * 4 + [constant(NEW) + checker] * 2 + [constant(NEW)] * 4
    assert tm.ghost_weights(frames, reference_clip(), 4)[:2] == pytest.approx([0, 0])
    assert tm.cut_frames(frames, reference_clip(), 4) == 2


def test_a_stream_batch_delay_shared_with_the_reference_costs_nothing():
    # Both outputs show the new scene one frame late: at the cut frame they still agree.
    late = [constant(OLD)] * 5 + [constant(NEW)] * 5
    assert tm.cut_frames(late, late, 4) == 0


def test_the_cut_must_leave_frames_on_both_sides():
    with pytest.raises(ValueError, match="both sides"):
        tm.cut_frames(reference_clip(), reference_clip(), 0)
    with pytest.raises(ValueError, match="both sides"):
        tm.cut_bound(reference_clip(), reference_clip(), 9)
