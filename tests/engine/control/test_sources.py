"""Control sources: canny with each session's thresholds, the image itself, a real (tiny, random) depth model,
and clear errors when the depth or pose weights are missing."""

from __future__ import annotations

import pytest
import torch
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

from engine import LoadConfig, StreamConfig
from engine.control import canny
from engine.control.sources import ControlSourceError, make_control_source

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_depth_dir(tmp_path_factory):
    """A Depth Anything model of the real classes at tiny width (seeded random weights) and its image processor,
    saved as a folder, as `huggingface-cli download` leaves a real one."""
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                 head_hidden_size=8, reassemble_hidden_size=32, patch_size=14)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("depth") / "tiny-depth-anything"
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def test_canny_follows_each_streams_thresholds():
    source = make_control_source(LoadConfig(controlnet="random"), CPU)
    frames = torch.rand(2, 3, 32, 40)
    low = source(frames, StreamConfig(canny_low_threshold=10, canny_high_threshold=30))
    high = source(frames, StreamConfig())
    assert low.shape == frames.shape
    assert torch.equal(low[1], canny(frames[1], 10, 30)) and torch.equal(high[0], canny(frames[0], 100, 200))
    assert float(low.mean()) > float(high.mean())


def test_image_is_the_frame_itself():
    frames = torch.rand(1, 3, 16, 16)
    assert make_control_source(LoadConfig(control_preprocessor="image"), CPU)(frames, StreamConfig()) is frames


def test_depth_maps_each_frame_to_its_normalised_depth(tiny_depth_dir):
    source = make_control_source(LoadConfig(control_preprocessor="depth",
                                            control_preprocessor_model=str(tiny_depth_dir)), CPU)
    frames = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    depth = source(frames, StreamConfig())
    assert depth.shape == frames.shape and depth.dtype == frames.dtype
    assert torch.equal(depth[:, 0], depth[:, 2])  # one map on three channels
    for each in depth:  # near is 1, far is 0, per frame
        assert float(each.min()) == 0 and float(each.max()) == pytest.approx(1)
    assert not torch.equal(depth[0], depth[1])


@pytest.mark.parametrize("preprocessor", ["depth", "pose"])
def test_missing_weights_name_themselves_and_how_to_get_them(tmp_path, monkeypatch, preprocessor):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "not-downloaded")
    with pytest.raises(ControlSourceError, match=r"not-downloaded|controlnet_aux") as raised:
        make_control_source(LoadConfig(control_preprocessor=preprocessor, control_preprocessor_model=missing), CPU)
    assert "download" in str(raised.value) or "pip install" in str(raised.value)
