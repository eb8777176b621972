"""Clips of real photographs for the temporal benchmark: camera motions over the pictures that ship inside
scikit-image (nothing is downloaded).

Every clip is a list of RGB uint8 frames (H, W, 3) and is deterministic for a given size, length and seed.
The photographs are the two the `demo` model never saw in training (docs/demo_model.md): `coffee` for the
camera moves and the `stereo_motorcycle` left view as the scene a cut switches to. The synthetic clips of
`benchmarks.clips` are smooth sine textures; steadiness is judged here on photographic detail instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

#: How much larger than the frame each photograph is scaled (its shorter side against the frame's): room
#: for the pans and the zoom, and the same framing of the scene at every frame size.
PHOTO_MARGIN = 1.5
#: Standard deviation of the still clip's sensor noise, on the 0-255 scale (a webcam in indoor light).
SENSOR_NOISE_SIGMA = 3.0
#: Relative zoom per frame of the `zoom` clip (at 256 px the frame's edges move 1.3 px per frame).
ZOOM_PER_FRAME = 0.01
#: Pixels per frame of the `fast` clip's camera swing and of the object crossing it.
FAST_PAN_SPEED = 8.0
FAST_OBJECT_SPEED = 16.0


@dataclass(frozen=True)
class Clip:
    """One test clip: its frames and, for a cut, the index of the first frame of the new scene."""

    name: str
    frames: list[np.ndarray]
    cut: int | None = None
    description: str = ""


def photo(name: str) -> np.ndarray:
    """An RGB uint8 photograph bundled with scikit-image (`coffee`, `stereo_motorcycle`, `chelsea`, ...)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # the stereo pair: its left view
        image = image[0]
    return np.ascontiguousarray(image[..., :3])


def fitted_photo(name: str, width: int, height: int) -> np.ndarray:
    """`photo(name)` scaled so that it covers `PHOTO_MARGIN` times the frame in both directions."""
    image = photo(name)
    scale = PHOTO_MARGIN * max(width / image.shape[1], height / image.shape[0])
    size = (max(width, round(image.shape[1] * scale)), max(height, round(image.shape[0] * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, size, interpolation=interpolation)


def view(image: np.ndarray, x: float, y: float, width: int, height: int, zoom: float = 1.0) -> np.ndarray:
    """The `width`×`height` window of `image` whose top-left corner is at (x, y), magnified `zoom` times about
    the window's centre; bilinear for fractional positions, an exact copy for whole-pixel ones at zoom 1."""
    cx, cy = x + width / 2, y + height / 2
    # Output pixel (u, v) shows the image at (cx + (u - width/2) / zoom, cy + (v - height/2) / zoom).
    matrix = np.array([[1 / zoom, 0, cx - width / (2 * zoom)], [0, 1 / zoom, cy - height / (2 * zoom)]])
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REFLECT)


def swing(index: int, speed: float, room: float) -> float:
    """Position after `index` frames at `speed` pixels per frame, bouncing between 0 and `room` (a camera
    that turns back at the end of the picture keeps its speed)."""
    if room <= 0:
        return 0.0
    travelled = (index * speed) % (2 * room)
    return travelled if travelled <= room else 2 * room - travelled


def still_noise(num_frames: int, width: int, height: int, seed: int = 0) -> Clip:
    """A still scene with webcam-like sensor noise: Gaussian, σ = `SENSOR_NOISE_SIGMA`/255, new every frame."""
    image = fitted_photo("coffee", width, height)
    base = view(image, (image.shape[1] - width) // 2, (image.shape[0] - height) // 2, width, height)
    rng = np.random.default_rng(seed)
    frames = [np.clip(base + rng.normal(0, SENSOR_NOISE_SIGMA, base.shape), 0, 255).round().astype(np.uint8)
              for _ in range(num_frames)]
    return Clip("still_noise", frames, description=f"still, sensor noise σ {SENSOR_NOISE_SIGMA:g}/255")


def pan(speed: float) -> Callable[..., Clip]:
    """The clip builder of a horizontal pan at `speed` pixels per frame (bilinear for fractional speeds)."""

    def build(num_frames: int, width: int, height: int, seed: int = 0) -> Clip:
        image = fitted_photo("coffee", width, height)
        y = (image.shape[0] - height) // 2
        room = image.shape[1] - width
        frames = [view(image, swing(index, speed, room), y, width, height) for index in range(num_frames)]
        return Clip(f"pan_{speed:g}px", frames, description=f"pan {speed:g} px/frame")

    return build


def zoom(num_frames: int, width: int, height: int, seed: int = 0) -> Clip:
    """A slow zoom into the scene's centre, `ZOOM_PER_FRAME` per frame."""
    image = fitted_photo("coffee", width, height)
    x, y = (image.shape[1] - width) / 2, (image.shape[0] - height) / 2
    frames = [view(image, x, y, width, height, (1 + ZOOM_PER_FRAME) ** index) for index in range(num_frames)]
    return Clip("zoom", frames, description=f"zoom in {ZOOM_PER_FRAME:.0%}/frame")


def fast(num_frames: int, width: int, height: int, seed: int = 0) -> Clip:
    """Fast motion: the camera swings `FAST_PAN_SPEED` px per frame while an object (a patch of another
    photograph) crosses the frame at `FAST_OBJECT_SPEED` px per frame, uncovering the background behind it."""
    image = fitted_photo("coffee", width, height)
    side = max(4, min(width, height) // 3)
    patch = cv2.resize(photo("chelsea")[40:260, 100:320], (side, side), interpolation=cv2.INTER_AREA)
    y = (image.shape[0] - height) // 2
    frames = []
    for index in range(num_frames):
        frame = view(image, swing(index, FAST_PAN_SPEED, image.shape[1] - width), y, width, height)
        ox = round(swing(index, FAST_OBJECT_SPEED, width - side))
        oy = round(swing(index, FAST_OBJECT_SPEED / 2, height - side))
        frame[oy:oy + side, ox:ox + side] = patch
        frames.append(frame)
    return Clip("fast", frames, description=f"swing {FAST_PAN_SPEED:g} px/frame, object {FAST_OBJECT_SPEED:g}")


def cut(num_frames: int, width: int, height: int, seed: int = 0) -> Clip:
    """A 1 px/frame pan over one photograph that cuts, halfway, to the same pan over another."""
    first, second = fitted_photo("coffee", width, height), fitted_photo("stereo_motorcycle", width, height)
    at = num_frames // 2
    frames = []
    for index in range(num_frames):
        image = first if index < at else second
        frames.append(view(image, swing(index, 1.0, image.shape[1] - width), (image.shape[0] - height) // 2,
                           width, height))
    return Clip("cut", frames, cut=at, description="pan 1 px/frame, hard cut halfway")


#: Every clip of the benchmark, by name, in the order the tables list them.
CLIPS: dict[str, Callable[..., Clip]] = {
    "still_noise": still_noise,
    "pan_1px": pan(1.0),
    "pan_1.5px": pan(1.5),
    "pan_2px": pan(2.0),
    "zoom": zoom,
    "fast": fast,
    "cut": cut,
}


def make_clip(name: str, num_frames: int, width: int, height: int, seed: int = 0) -> Clip:
    """The clip `name` of `CLIPS` with `num_frames` frames of `width`×`height`."""
    if name not in CLIPS:
        raise ValueError(f"unknown clip {name!r}; choose from {', '.join(CLIPS)}")
    if num_frames < 2:
        raise ValueError(f"a clip needs at least 2 frames, got {num_frames}")
    return CLIPS[name](num_frames, width, height, seed)
