"""Training and evaluation images for the `demo` model: the photographs shipped inside scikit-image.

Nothing is downloaded: every image here is a file of the scikit-image wheel. `coffee` and the stereo
motorcycle are held out for evaluation; the rest are cut into augmented random crops for training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["HELD_OUT_IMAGES", "TRAIN_IMAGES", "CropSampler", "load_images", "moving_crops", "require_skimage"]

# Colour photographs first; a few gray ones (turned to RGB) add textures and faces-free scenes.
TRAIN_IMAGES: tuple[str, ...] = ("astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                                 "retina", "camera", "coins", "brick", "grass", "gravel", "moon")
HELD_OUT_IMAGES: tuple[str, ...] = ("coffee", "motorcycle")


def require_skimage():
    """The `skimage.data` module, or an `ImportError` saying how to install it (the `train` extra)."""
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError("the demo model's images come from scikit-image: pip install -e '.[train]'") from error
    return data


def _loader(name: str) -> Callable[[], np.ndarray]:
    data = require_skimage()
    if name == "motorcycle":
        return lambda: data.stereo_motorcycle()[0]
    return getattr(data, name)


def load_images(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named `skimage.data` images as RGB uint8 arrays (gray ones repeated to three channels)."""
    images = {}
    for name in names:
        image = np.asarray(_loader(name)())
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        images[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    return images


def _jitter_colour(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Brightness, contrast, saturation and a small hue shift, like a webcam's varying exposure and white balance.
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-8, 8)) % 180
    hsv[..., 1] *= rng.uniform(0.6, 1.4)
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.75, 1.25) + mean * rng.uniform(0.7, 1.3)
    return np.clip(out, 0, 255).astype(np.uint8)


@dataclass
class CropSampler:
    """Random square crops of a set of images, at a random scale, flipped and colour-jittered.

    Args:
        images (`dict[str, np.ndarray]`): RGB uint8 source images.
        size (`int`): side of each crop in pixels.
        seed (`int`, defaults to 0): seed of the sampler's random generator.
    """

    images: dict[str, np.ndarray]
    size: int
    seed: int = 0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._names = sorted(self.images)

    def sample(self) -> np.ndarray:
        """One `[size, size, 3]` RGB uint8 crop."""
        rng = self._rng
        image = self.images[self._names[rng.integers(len(self._names))]]
        height, width = image.shape[:2]
        # Crops cover between the whole shorter side and a third of it, then are resized to `size`:
        # content appears at many scales, as it does in front of a webcam.
        side = int(min(height, width) * rng.uniform(0.33, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = cv2.resize(image[top:top + side, left:left + side], (self.size, self.size),
                          interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        return _jitter_colour(np.ascontiguousarray(crop), rng)


def moving_crops(image: np.ndarray, frames: int, size: int, zoom: float = 0.6) -> list[np.ndarray]:
    """A slow diagonal pan over `image`: `frames` crops of `zoom` times its shorter side, resized to `size`."""
    height, width = image.shape[:2]
    side = int(min(height, width) * zoom)
    crops = []
    for index in range(frames):
        progress = index / max(frames - 1, 1)
        top, left = int((height - side) * progress), int((width - side) * progress)
        crop = image[top:top + side, left:left + side]
        crops.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
    return crops
