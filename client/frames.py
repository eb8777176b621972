"""Frame helpers shared by the clients (OpenCV BGR images in, encoded bytes out, and back)."""

from __future__ import annotations

import cv2
import numpy as np


def fit_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre-crop `image` to the aspect ratio of `width`×`height`, then resize to exactly that size."""
    source_height, source_width = image.shape[:2]
    if width <= 0 or height <= 0:
        raise ValueError(f"`width` and `height` must be positive, got {width}x{height}")
    if (source_width, source_height) == (width, height):
        return image
    scale = min(source_width / width, source_height / height)
    crop_width, crop_height = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (source_width - crop_width) // 2, (source_height - crop_height) // 2
    cropped = image[top:top + crop_height, left:left + crop_width]
    shrinking = crop_width > width
    return cv2.resize(cropped, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of a BGR uint8 image."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("OpenCV could not encode the frame as JPEG")
    return buffer.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """A BGR uint8 image from encoded bytes (the server's JPEG outputs)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"could not decode a {len(data)}-byte output frame")
    return image
