"""Frame codecs reject bad input with stable codes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.codec import ImageDecodeError, decode_image, encode_jpeg, rgb_to_tensor, tensor_to_rgb


def encoded(fmt: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_are_cropped_and_resized(fmt):
    rgb = decode_image(encoded(fmt), 32, 16)
    assert rgb.shape == (16, 32, 3) and rgb.dtype == np.uint8
    assert abs(int(rgb[8, 16, 0]) - 200) < 8


@pytest.mark.parametrize("data,code", [
    (b"", "empty_frame"),
    (b"definitely not an image", "bad_image"),
    (encoded("JPEG")[:60], "bad_image"),
    (encoded("GIF"), "unsupported_format"),
    (encoded("PNG", size=(300, 300)), "image_too_large"),
])
def test_bad_frames_have_stable_codes(data, code):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, 32, 32, max_pixels=200 * 200)
    assert info.value.code == code


def test_round_trip_through_tensor_and_jpeg():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:, :8] = 255
    assert np.array_equal(tensor_to_rgb(rgb_to_tensor(rgb)), rgb)
    back = decode_image(encode_jpeg(rgb, quality=95), 16, 16)
    assert np.abs(back.astype(int) - rgb.astype(int)).mean() < 10
