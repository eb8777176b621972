"""Sources and sinks: what opens here, and the clear messages for what does not."""

import cv2
import numpy as np
import pytest

from client.sinks import SinkUnavailable, VideoFileSink, VirtualCameraSink, WindowSink
from client.sources import SourceUnavailable, SyntheticSource, VideoFileSource, open_source


def test_synthetic_source_moves():
    source = open_source("synthetic", 48, 32)
    assert isinstance(source, SyntheticSource)
    first, second = source.read(), source.read()
    assert first.shape == (32, 48, 3) and first.dtype == np.uint8
    assert not np.array_equal(first, second)


def test_missing_video_file_is_reported(tmp_path):
    with pytest.raises(SourceUnavailable, match="does not exist"):
        open_source(str(tmp_path / "missing.mp4"), 64, 64)


def test_missing_camera_is_reported_with_a_hint():
    with pytest.raises(SourceUnavailable, match="no camera at index 97.*synthetic"):
        open_source("97", 64, 64)


def test_video_file_sink_and_source_round_trip(tmp_path):
    path = tmp_path / "clip.mp4"
    sink = VideoFileSink(path, fps=12.0)
    synthetic = SyntheticSource(64, 48)
    for _ in range(7):
        sink.write(synthetic.read())
    sink.write(np.zeros((10, 10, 3), np.uint8))  # another size is fitted to the file's
    sink.close()
    source = VideoFileSource(path)
    frames = []
    while (frame := source.read()) is not None:
        frames.append(frame)
    source.close()
    assert len(frames) == 8 and frames[0].shape == (48, 64, 3)
    assert source.fps == pytest.approx(12.0)


def test_video_file_sink_needs_an_existing_folder(tmp_path):
    with pytest.raises(SinkUnavailable, match="does not exist"):
        VideoFileSink(tmp_path / "nope" / "x.mp4", fps=10.0)


def _virtual_camera_or_reason():
    try:
        return VirtualCameraSink(64, 64, 30.0), None
    except SinkUnavailable as error:
        return None, str(error)


def test_virtual_camera_sends_frames_where_a_device_exists():
    sink, reason = _virtual_camera_or_reason()
    if sink is None:
        print(f"skipping: {reason}")
        pytest.skip(f"no virtual camera device here: {reason}")
    try:
        for index in range(5):
            sink.write(np.full((64, 64, 3), index * 40, np.uint8))
        assert sink.device
    finally:
        sink.close()


def test_missing_virtual_camera_explains_how_to_get_one():
    sink, reason = _virtual_camera_or_reason()
    if sink is not None:
        sink.close()
        pytest.skip(f"a virtual camera exists here ({sink.device})")
    assert "modprobe v4l2loopback" in reason or "OBS" in reason or "pip install" in reason


def test_window_without_gui_explains_the_fix():
    if "GUI:                           NONE" not in cv2.getBuildInformation():
        pytest.skip("this OpenCV build has a GUI")
    with pytest.raises(SinkUnavailable, match="pip install opencv-python"):
        WindowSink("test-window")


def test_synthetic_source_draws_at_the_preferred_size():
    source = open_source("synthetic", 512, 512)
    source.prefer_size(40, 24)
    assert source.read().shape == (24, 40, 3)
