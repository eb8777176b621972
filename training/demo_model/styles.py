"""The `demo` model's styles: classical image filters and the prompt phrases that name them.

Each style is a deterministic OpenCV/numpy filter of an RGB uint8 image. The trained `demo` model learns
to apply them from the prompt; these functions are its training targets and its evaluation reference.
`photo` (the identity) is what prompts naming no style fall back to.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["FALLBACK_STYLE", "STYLES", "Style", "sample_prompt", "style_of_prompt", "stylize"]

FALLBACK_STYLE = "photo"


def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _photo(rgb: np.ndarray) -> np.ndarray:
    return rgb.copy()


def _pencil_sketch(rgb: np.ndarray) -> np.ndarray:
    # Colour dodge of the gray image with its blurred negative: the classic graphite look.
    gray = _gray(rgb).astype(np.float32)
    blurred_negative = cv2.GaussianBlur(255 - gray, (0, 0), sigmaX=3)
    sketch = np.clip(gray * 255 / np.maximum(255 - blurred_negative, 1), 0, 255)
    return np.repeat(sketch.astype(np.uint8)[..., None], 3, axis=2)


def _neon_edges(rgb: np.ndarray) -> np.ndarray:
    # Soft Sobel edges (thick enough for a 1/8-resolution latent to carry) in the image's own hues at
    # full saturation, glowing on black.
    gray = cv2.GaussianBlur(_gray(rgb).astype(np.float32) / 255, (0, 0), sigmaX=1.2)
    magnitude = cv2.magnitude(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    edges = np.clip((magnitude - 0.15) * 2.5, 0, 1)
    glow = np.clip(edges + cv2.GaussianBlur(edges, (0, 0), sigmaX=2) * 0.8, 0, 1)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = 255
    hsv[..., 2] = 255
    neon = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB).astype(np.float32)
    return np.clip(neon * glow[..., None], 0, 255).astype(np.uint8)


_SEPIA = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)


def _sepia_photo(rgb: np.ndarray) -> np.ndarray:
    return np.clip(rgb.astype(np.float32) @ _SEPIA.T, 0, 255).astype(np.uint8)


def _pop_art_posterize(rgb: np.ndarray) -> np.ndarray:
    # Boosted saturation, then three levels per channel: flat, loud colour areas.
    hsv = cv2.cvtColor(cv2.medianBlur(rgb, 3), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] * 1.8, 0, 255)
    saturated = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    levels = np.round(saturated.astype(np.float32) / 127.5)
    return np.clip(levels * 127.5, 0, 255).astype(np.uint8)


def _cool_blue_tint(rgb: np.ndarray) -> np.ndarray:
    tinted = rgb.astype(np.float32) * np.array([0.75, 0.92, 1.1], dtype=np.float32) + np.array([0, 8, 30])
    return np.clip(tinted, 0, 255).astype(np.uint8)


def _thermal_camera(rgb: np.ndarray) -> np.ndarray:
    gray = cv2.GaussianBlur(_gray(rgb), (0, 0), sigmaX=1.5)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def _watercolor_painting(rgb: np.ndarray) -> np.ndarray:
    # Edge-preserving smoothing with lifted, softened colours (the engine's default prompt is a watercolour).
    smooth = cv2.stylization(rgb, sigma_s=30, sigma_r=0.4)
    return cv2.addWeighted(smooth, 0.85, np.full_like(smooth, 255), 0.15, 0)


@dataclass(frozen=True)
class Style:
    """One style: its filter and the phrases (lower case) that name it in a prompt.

    Args:
        name (`str`): the canonical phrase, e.g. `"pencil sketch"`.
        apply (`Callable[[np.ndarray], np.ndarray]`): RGB uint8 `[H, W, 3]` to RGB uint8 of the same shape.
        phrases (`tuple[str, ...]`): phrases that select the style (the first is `name`).
    """

    name: str
    apply: Callable[[np.ndarray], np.ndarray]
    phrases: tuple[str, ...]


STYLES: dict[str, Style] = {style.name: style for style in (
    Style("photo", _photo, ("photo", "a photo", "photograph", "realistic", "original")),
    Style("pencil sketch", _pencil_sketch, ("pencil sketch", "pencil drawing", "sketch", "graphite drawing")),
    Style("neon edges", _neon_edges, ("neon edges", "neon", "glowing edges", "neon outline")),
    Style("sepia photo", _sepia_photo, ("sepia photo", "sepia", "old photo", "vintage photo")),
    Style("pop art posterize", _pop_art_posterize, ("pop art posterize", "pop art", "posterize", "posterized")),
    Style("cool blue tint", _cool_blue_tint, ("cool blue tint", "blue tint", "cool tone", "cold blue")),
    Style("thermal camera", _thermal_camera, ("thermal camera", "thermal", "infrared", "heat map")),
    Style("watercolor painting", _watercolor_painting, ("watercolor painting", "watercolor", "watercolour")),
)}

# Words that carry no style: training prompts mix them in so that the style phrase is what matters, and
# prompts made only of them (or of random letters) teach the fallback to `photo`.
_FILLER = ("portrait", "a person", "high quality", "soft light", "detailed", "in a room", "a cat", "a face",
           "4k", "best quality", "studio", "of a man", "of a woman", "outdoors", "close-up", "low quality", "blurry")


def stylize(rgb: np.ndarray, style: str) -> np.ndarray:
    """`STYLES[style]` applied to an RGB uint8 image."""
    return STYLES[style].apply(rgb)


def style_of_prompt(prompt: str) -> str:
    """The style a prompt names (its longest matching phrase), or `FALLBACK_STYLE` when it names none."""
    text = prompt.lower()
    best, best_length = FALLBACK_STYLE, 0
    for style in STYLES.values():
        for phrase in style.phrases:
            if phrase in text and len(phrase) > best_length:
                best, best_length = style.name, len(phrase)
    return best


def _random_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))


def sample_prompt(style: str, rng: random.Random) -> str:
    """A random training prompt for `style`: one of its phrases, sometimes with filler words around it.

    For `FALLBACK_STYLE` it is also, half of the time, a prompt naming no style at all (filler words,
    random letters or empty), so unknown prompts leave the image as it is.
    """
    extras = [rng.choice(_FILLER) for _ in range(rng.choice((0, 0, 1, 2)))]
    if style == FALLBACK_STYLE and rng.random() < 0.5:
        words = extras + [_random_word(rng) for _ in range(rng.randint(0, 2))]
        rng.shuffle(words)
        prompt = ", ".join(words)
        return prompt if style_of_prompt(prompt) == FALLBACK_STYLE else ""
    phrase = rng.choice(STYLES[style].phrases)
    parts = [*extras, phrase] if rng.random() < 0.5 else [phrase, *extras]
    return ", ".join(parts)
