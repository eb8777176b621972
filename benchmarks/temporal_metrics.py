"""Temporal steadiness of a video: pure functions on RGB frames, all on the 0-255 scale.

The central measure is the flow warping error of Lai et al. (ECCV 2018, "Learning Blind Video Temporal
Consistency"): the output frame t is carried along the optical flow of the *input* to frame t+1 and compared
with output frame t+1 wherever the flow is trustworthy. What the camera did is known from the input, so
whatever else changes between two outputs is flicker or drift the model added. Flow is estimated with
OpenCV (Farneback by default, DIS on request; the primitives are the engine's own, `engine.motion`, which its
`flow` mechanism uses too); pixels without a trustworthy flow (occluded or uncovered in
the next frame, or carried out of the picture) are masked by the forward-backward consistency test of
Sundaram et al. (ECCV 2010), as Ruder et al. use it for video style transfer (GCPR 2016).

Frames are (H, W, 3) arrays, uint8 or float, values in 0-255. A *pair* t is the frames (t, t+1).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from engine.motion import occlusion_mask, optical_flow, warp

#: `cut_frames`: the output counts as recovered from a cut once its mean distance from the method-off output
#: exceeds its steady distance by at most this fraction of the distance between the two scenes (`cut_bound`)
#: and the old scene's weight in it (`ghost_weights`) is at most this fraction too.
CUT_BOUND_FRACTION = 0.1


@dataclass(frozen=True)
class Motion:
    """The input's motion from frame t to frame t+1, seen from frame t+1.

    Attributes:
        flow (`np.ndarray`): (H, W, 2) float32, per pixel p of frame t+1 the offset (dx, dy) to where it was in
            frame t: `warp(frame_t, flow)` lines frame t up with frame t+1.
        mask (`np.ndarray`): (H, W) bool, True where that offset is trustworthy (`occlusion_mask`).
    """

    flow: np.ndarray
    mask: np.ndarray


def pair_motion(previous: np.ndarray, current: np.ndarray, method: str = "farneback") -> Motion:
    """The `Motion` from `previous` to `current` (flow in both directions and the consistency mask)."""
    flow = optical_flow(current, previous, method)
    return Motion(flow, occlusion_mask(flow, optical_flow(previous, current, method)))


def clip_motion(frames: Sequence[np.ndarray], method: str = "farneback") -> list[Motion]:
    """The `Motion` of every pair of consecutive `frames` (one fewer than the frames)."""
    return [pair_motion(frames[t], frames[t + 1], method) for t in range(len(frames) - 1)]


def _pairs(count: int, skip: Collection[int]) -> list[int]:
    pairs = [t for t in range(count) if t not in skip]
    if not pairs:
        raise ValueError("no frame pair left to measure")
    return pairs


def warp_error(frames: Sequence[np.ndarray], motion: Sequence[Motion], skip: Collection[int] = ()) -> float:
    """Occlusion-masked mean |frame[t+1] − warp(frame[t], flow)|, over channels and masked pixels of a pair,
    then over the pairs (0-255).

    Args:
        frames (`Sequence[np.ndarray]`): the video to score (input or output frames).
        motion (`Sequence[Motion]`): the input's motion per pair, `len(frames) - 1` of them.
        skip (`Collection[int]`, defaults to empty): pairs left out (e.g. the one across a cut, where no
            flow exists); a pair whose mask is empty is left out too.
    """
    if len(motion) != len(frames) - 1:
        raise ValueError(f"need one Motion per pair: {len(frames)} frames, {len(motion)} motions")
    errors = []
    for t in _pairs(len(motion), skip):
        mask = motion[t].mask
        if mask.any():
            difference = np.abs(np.asarray(frames[t + 1], np.float32) - warp(frames[t], motion[t].flow))
            errors.append(float(difference[mask].mean(dtype=np.float64)))
    if not errors:
        raise ValueError("no pair has a trustworthy flow anywhere")
    return float(np.mean(errors))


def consecutive_l1(frames: Sequence[np.ndarray], skip: Collection[int] = ()) -> float:
    """Mean |frame[t+1] − frame[t]| over pixels, channels and pairs not in `skip`, without motion
    compensation (0-255)."""
    return float(np.mean([np.abs(np.asarray(frames[t + 1], np.float64) - np.asarray(frames[t], np.float64)).mean()
                          for t in _pairs(len(frames) - 1, skip)]))


def gradient_magnitude(frame: np.ndarray) -> float:
    """Mean Sobel gradient magnitude of a frame, per channel and pixel (0-255 per pixel of distance)."""
    image = np.asarray(frame, np.float32)
    # Sobel's 3×3 kernel weighs the difference of two pixels four times; /8 makes a unit step per pixel 1.
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3) / 8
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3) / 8
    return float(np.sqrt(gx ** 2 + gy ** 2).mean(dtype=np.float64))


def detail(frames: Sequence[np.ndarray]) -> float:
    """Mean gradient magnitude over `frames` (`gradient_magnitude`): falls when a method blurs."""
    return float(np.mean([gradient_magnitude(frame) for frame in frames]))


def mean_l1(frames: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """Mean |frame − reference| over paired frames, pixels and channels (0-255)."""
    if len(frames) != len(reference):
        raise ValueError(f"{len(frames)} frames against {len(reference)} references")
    return float(np.mean([np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean()
                          for a, b in zip(frames, reference, strict=True)]))


def _scene_change(reference: Sequence[np.ndarray], cut: int) -> float:
    """Mean |reference[-1] − reference[cut − 1]|: how far apart the method-off outputs of the two scenes are
    (the last frame of the clip against the last frame before the cut)."""
    if not 0 < cut < len(reference) - 1:
        raise ValueError(f"the cut must leave frames on both sides (1..{len(reference) - 2}), got {cut}")
    return mean_l1([reference[-1]], [reference[cut - 1]])


def cut_bound(frames: Sequence[np.ndarray], reference: Sequence[np.ndarray], cut: int,
              fraction: float = CUT_BOUND_FRACTION) -> float:
    """The distance from the method-off `reference` within which `cut_frames` counts an output as recovered:
    the output's own steady distance from the reference on the new scene (the median over the second half of
    the frames after the cut: what the method changes by design, which `ref_l1` and `detail` judge) plus
    `fraction` of the distance between the two scenes' reference outputs.

    A ghost of the old scene blended in at weight w adds about w times the scenes' distance, so 0.1 lets
    through a ghost too faint to see; a ghost that never fades, which this steady distance would absorb, is
    caught by `ghost_weights`.
    """
    change = _scene_change(reference, cut)
    settled = (cut + len(reference)) // 2
    steady = float(np.median([mean_l1([a], [b]) for a, b in zip(frames[settled:], reference[settled:],
                                                                 strict=True)]))
    return steady + fraction * change


def ghost_weights(frames: Sequence[np.ndarray], reference: Sequence[np.ndarray], cut: int) -> list[float | None]:
    """Per frame from `cut` on, the weight w of the old scene in the output: the least-squares fit of
    `frame − reference ≈ w · (old − reference)`, `old` being the reference's last frame before the cut.

    None while the reference itself still shows the old scene (closer to `old` than half the scenes'
    distance): a stream batch shows a cut a frame or more late, and the output is not asked to be faster.
    """
    old = np.asarray(reference[cut - 1], np.float64)
    change = _scene_change(reference, cut)
    weights: list[float | None] = []
    for frame, target in zip(frames[cut:], reference[cut:], strict=True):
        target = np.asarray(target, np.float64)
        direction = old - target
        if np.abs(direction).mean() < change / 2:
            weights.append(None)
        else:
            weights.append(float(((np.asarray(frame, np.float64) - target) * direction).sum()
                                 / (direction ** 2).sum()))
    return weights


def cut_frames(frames: Sequence[np.ndarray], reference: Sequence[np.ndarray], cut: int,
               fraction: float = CUT_BOUND_FRACTION) -> int:
    """Frames from the cut until the output stays recovered: within `cut_bound` of the method-off `reference`
    and with a ghost of the old scene (`ghost_weights`) of at most `fraction`.

    The smallest k such that every frame from `cut + k` to the end is recovered: 0 when the output follows
    the new scene as fast as the method off does. The output must *stay* recovered, so a frame that happens
    to pass in the middle of a fading ghost does not end the count; one that never recovers (a frozen
    picture) scores the number of frames from the cut to the end.
    """
    bound = cut_bound(frames, reference, cut, fraction)
    distances = [mean_l1([a], [b]) for a, b in zip(frames[cut:], reference[cut:], strict=True)]
    ghosts = ghost_weights(frames, reference, cut)
    outside = [k for k, (distance, ghost) in enumerate(zip(distances, ghosts, strict=True))
               if distance > bound or (ghost is not None and ghost > fraction)]
    return outside[-1] + 1 if outside else 0
