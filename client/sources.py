"""Frame sources for the webcam client: a camera index, a video file, or the synthetic moving pattern."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import cv2
import numpy as np

from .patterns import moving_pattern

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


class SourceUnavailable(RuntimeError):
    """The source cannot be opened; the message says why and what to do."""


def camera_hint() -> str:
    if sys.platform.startswith("linux"):
        return ("check that a camera is connected (ls /dev/video*), that your user may use it (group `video`), "
                "and in a container pass it through (--device /dev/video0); or use --source synthetic")
    return "check that a camera is connected and that this terminal may use it (privacy settings); " \
           "or use --source synthetic"


class FrameSource:
    """Produces BGR frames. `live` sources (cameras) always give the newest frame; others give every frame."""

    live = False
    fps: float | None = None

    def read(self) -> np.ndarray | None:
        """The next frame, or `None` when the source has ended."""
        raise NotImplementedError

    def prefer_size(self, width: int, height: int) -> None:
        """The size frames will be sent at; sources that draw their frames can draw them at that size."""

    def close(self) -> None:
        """Release the device or file."""


class SyntheticSource(FrameSource):
    """The engine's endless moving pattern (no camera needed)."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.index = 0

    def prefer_size(self, width: int, height: int) -> None:
        self.width, self.height = width, height

    def read(self) -> np.ndarray:
        frame = cv2.cvtColor(moving_pattern(self.index, self.width, self.height), cv2.COLOR_RGB2BGR)
        self.index += 1
        return frame


class VideoFileSource(FrameSource):
    """Every frame of a video file, in order, until its end."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise SourceUnavailable(f"video file {str(path)!r} does not exist")
        self.capture = cv2.VideoCapture(str(path))
        if not self.capture.isOpened():
            raise SourceUnavailable(f"OpenCV cannot open {str(path)!r} as a video (unsupported format or codec?)")
        reported = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = reported if reported and reported > 0 else None

    def read(self) -> np.ndarray | None:
        ok, frame = self.capture.read()
        return frame if ok else None

    def close(self) -> None:
        self.capture.release()


class CameraSource(FrameSource):
    """A camera through OpenCV. A thread keeps reading so `read` returns the newest frame, never a stale one
    from the driver's buffer."""

    live = True

    def __init__(self, index: int, open_timeout_s: float = 5.0):
        self.capture = cv2.VideoCapture(index)
        if not self.capture.isOpened():
            raise SourceUnavailable(f"no camera at index {index}: {camera_hint()}")
        ok, frame = self.capture.read()
        if not ok:
            self.capture.release()
            raise SourceUnavailable(f"camera {index} opened but gave no frame: {camera_hint()}")
        reported = self.capture.get(cv2.CAP_PROP_FPS)
        self.fps = reported if reported and reported > 0 else None
        self._latest: np.ndarray | None = frame
        self._fresh = threading.Condition()
        self._running = True
        self._open_timeout_s = open_timeout_s
        self._thread = threading.Thread(target=self._keep_reading, name=f"camera-{index}", daemon=True)
        self._thread.start()

    def _keep_reading(self) -> None:
        while self._running:
            ok, frame = self.capture.read()
            with self._fresh:
                self._latest = frame if ok else None
                self._fresh.notify_all()
            if not ok:
                logger.error("the camera stopped delivering frames")
                return

    def read(self) -> np.ndarray | None:
        with self._fresh:
            frame, self._latest = self._latest, None
            if frame is None and self._thread.is_alive():
                self._fresh.wait(self._open_timeout_s)
                frame, self._latest = self._latest, None
        return frame

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2.0)
        self.capture.release()


def open_source(spec: str, width: int, height: int) -> FrameSource:
    """`spec` is a camera index (`0`), a video file path, or `synthetic` (made at `width`×`height`).

    Raises:
        SourceUnavailable: the camera or file cannot be opened.
    """
    if spec == SYNTHETIC:
        return SyntheticSource(width, height)
    if spec.isdigit():
        return CameraSource(int(spec))
    return VideoFileSource(Path(spec))
