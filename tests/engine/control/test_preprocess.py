"""`engine.control.preprocess`: canny and image control images, their representation and their validation."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from engine.codec import rgb_to_tensor
from engine.control import DEMO_CONTROLNET_DIR, canny, image


def _square(size: int = 32) -> np.ndarray:
    """A white square on black: edges exactly along its border."""
    frame = np.zeros((size, size, 3), dtype=np.uint8)
    frame[8:24, 8:24] = 255
    return frame


def _noise(seed: int = 0, size: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)


def test_canny_is_opencv_canny_of_the_gray_frame_in_three_channels():
    frame = _noise()
    expected = cv2.Canny(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), 100, 200)
    control = canny(frame)
    assert control.shape == (3, 48, 56) and control.dtype == torch.float32
    assert set(control.unique().tolist()) <= {0.0, 1.0}
    for channel in control:
        assert torch.equal(channel, torch.from_numpy(expected).float() / 255)


def test_canny_marks_the_border_of_a_square_and_nothing_inside_or_outside():
    control = canny(_square())[0]
    assert control.sum() > 0
    assert control[12:20, 12:20].sum() == 0 and control[:4].sum() == 0 and control[:, :4].sum() == 0
    assert control[6:26, 6:26].sum() == control.sum()


def test_a_tensor_frame_gives_the_same_edges_on_its_device_and_dtype():
    frame = _noise(1)
    assert torch.equal(canny(rgb_to_tensor(frame)), canny(frame))
    half = canny(rgb_to_tensor(frame).half(), 50, 150)
    assert half.dtype == torch.float16 and torch.equal(half.float(), canny(frame, 50, 150))


def test_thresholds_set_how_many_edges_survive():
    frame = _noise(2)
    counts = [canny(frame, low, high).sum().item() for low, high in ((10, 30), (100, 200), (400, 800))]
    assert counts[0] > counts[1] > counts[2]
    assert canny(frame, 150, 150).shape == (3, 48, 56)  # equal thresholds are allowed


def test_image_is_the_frame_itself():
    frame = _noise(3)
    assert torch.equal(image(frame), rgb_to_tensor(frame))
    tensor = rgb_to_tensor(frame)
    assert image(tensor) is tensor


@pytest.mark.parametrize("frame", [
    np.zeros((8, 8), dtype=np.uint8),  # gray
    np.zeros((8, 8, 4), dtype=np.uint8),  # RGBA
    np.zeros((8, 8, 3), dtype=np.float32),  # float array
    np.zeros((0, 8, 3), dtype=np.uint8),  # empty
    torch.zeros(8, 8, 3),  # channels last
    torch.zeros(1, 3, 8, 8),  # batched
    torch.zeros(3, 8, 8, dtype=torch.uint8),  # integer tensor
    torch.full((3, 8, 8), -0.5),  # the VAE's [-1, 1] range
    torch.full((3, 8, 8), float("nan")),
    [[0, 0, 0]],
], ids=["gray", "rgba", "float-array", "empty", "hwc-tensor", "batched", "uint8-tensor", "minus-one", "nan", "list"])
def test_bad_frames_are_refused_naming_the_argument(frame):
    for preprocess in (canny, image):
        with pytest.raises(ValueError, match="`frame`"):
            preprocess(frame)


@pytest.mark.parametrize(("low", "high", "name"), [
    (-1, 200, "low_threshold"), (100, float("inf"), "high_threshold"), (float("nan"), 200, "low_threshold"),
    (True, 200, "low_threshold"), (100, "200", "high_threshold"), (300, 200, "low_threshold"),
])
def test_bad_thresholds_are_refused_naming_the_argument(low, high, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        canny(_square(), low, high)


def test_the_demo_controlnet_folder_is_beside_the_demo_model():
    assert DEMO_CONTROLNET_DIR.parent.name == "engine" and DEMO_CONTROLNET_DIR.name == "demo_controlnet"
