"""Image codecs at the engine's edge: encoded bytes → RGB tensor, tensor → JPEG."""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})


# Why a frame is answered with an error instead of an output: the engine's vocabulary, which the WebSocket
# protocol (`wire.FRAME_ERROR_CODES`) repeats for its clients; a test holds the two sets equal.
EMPTY_FRAME = "empty_frame"
UNSUPPORTED_FORMAT = "unsupported_format"
BAD_IMAGE = "bad_image"
IMAGE_TOO_LARGE = "image_too_large"
INFERENCE_FAILED = "inference_failed"
FRAME_ERROR_CODES: frozenset[str] = frozenset({EMPTY_FRAME, UNSUPPORTED_FORMAT, BAD_IMAGE, IMAGE_TOO_LARGE,
                                               INFERENCE_FAILED})


class FrameError(ValueError):
    """A frame that gets an error answer instead of an output; `code` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ImageDecodeError(FrameError):
    """An input frame that cannot be decoded (`empty_frame`, `unsupported_format`, `bad_image`,
    `image_too_large`)."""


def _upright(image: Image.Image) -> Image.Image:
    """`image` turned by its EXIF orientation; as it is when the EXIF block is unreadable.

    Broken metadata must not cost a frame whose pixels decoded fine (Pillow raises `SyntaxError`,
    `ValueError`, `struct.error`, ... for garbage EXIF).
    """
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:
        logger.debug("ignoring unreadable EXIF: %r", error)
        return image


def decode_image(data: bytes, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a JPEG/PNG/WebP frame and centre-crop/resize it to `width`×`height` RGB uint8 (H, W, 3).

    A JPEG larger than the target is decoded at a reduced scale (DCT scaling, `Image.draft`), which costs a
    fraction of a full decode and still leaves at least `width`×`height` pixels to crop from.

    Raises:
        ImageDecodeError: `empty_frame`, `unsupported_format`, `bad_image` or `image_too_large`.
    """
    if not data:
        raise ImageDecodeError(EMPTY_FRAME, "the frame is 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise ImageDecodeError(UNSUPPORTED_FORMAT,
                                       f"frames must be JPEG, PNG or WebP, got {image.format or 'unknown'}")
            if image.width * image.height > max_pixels:
                raise ImageDecodeError(
                    IMAGE_TOO_LARGE,
                    f"{image.width}x{image.height} exceeds the limit of {max_pixels} pixels")
            if image.format == "JPEG":
                image.draft("RGB", (width, height))
            image.load()
            image = _upright(image).convert("RGB")
            if image.size != (width, height):
                image = ImageOps.fit(image, (width, height), method=Image.Resampling.BILINEAR)
            return np.array(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageDecodeError(IMAGE_TOO_LARGE, str(error)) from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        raise ImageDecodeError(BAD_IMAGE, f"not a decodable image: {error}") from error


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an RGB uint8 (H, W, 3) array."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def rgb_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255)


def tensor_to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] → (H, W, 3) uint8."""
    return image.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
