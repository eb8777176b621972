"""Output sinks for the webcam client: an OpenCV window, a virtual camera (pyvirtualcam), a video file."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from .prompt_input import PromptEditor

VCAM_INSTALL_HINT = "install the extra: pip install 'streamdiff-server[vcam]' (pyvirtualcam)"


class SinkUnavailable(RuntimeError):
    """An output cannot be opened; the message says why and what to install or run."""


def virtual_camera_hint() -> str:
    if sys.platform.startswith("linux"):
        return ("load the v4l2loopback kernel module: sudo modprobe v4l2loopback devices=1 exclusive_caps=1 "
                "(Debian/Ubuntu: sudo apt install v4l2loopback-dkms); or, without a virtual camera, add the "
                "server's per-session view to OBS as a Browser Source (docs/clients.md)")
    return ("install OBS Studio (28 or newer) and start its Virtual Camera once so the driver is registered; "
            "or add the server's per-session view to OBS as a Browser Source (docs/clients.md)")


class FrameSink:
    """Takes BGR output frames."""

    def write(self, frame: np.ndarray) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release."""


def _fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Outputs keep one size per sink even if a reconnect lands on a server with another size."""
    if frame.shape[1] == width and frame.shape[0] == height:
        return frame
    return cv2.resize(frame, (width, height), interpolation=cv2.INTER_LINEAR)


class VideoFileSink(FrameSink):
    """An OpenCV VideoWriter (`.mp4` as mp4v, `.avi` as MJPG), opened at the first frame's size."""

    def __init__(self, path: Path, fps: float):
        self.path, self.fps = path, fps
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.frames = 0
        if not path.parent.exists():
            raise SinkUnavailable(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist")

    def write(self, frame: np.ndarray) -> None:
        if self.writer is None:
            self.size = (frame.shape[1], frame.shape[0])
            fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"))
            self.writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, self.size)
            if not self.writer.isOpened():
                raise SinkUnavailable(f"OpenCV cannot write video {str(self.path)!r} (unknown extension or codec?)")
        self.writer.write(_fit(frame, *self.size))
        self.frames += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()


class VirtualCameraSink(FrameSink):
    """A virtual camera through pyvirtualcam (v4l2loopback on Linux, OBS Virtual Camera on Windows/macOS)
    that OBS, a VTuber tool or a video call can pick as a webcam."""

    def __init__(self, width: int, height: int, fps: float, device: str | None = None):
        try:
            import pyvirtualcam
        except ImportError as error:
            raise SinkUnavailable(f"pyvirtualcam is not installed: {VCAM_INSTALL_HINT}") from error
        try:
            self.camera = pyvirtualcam.Camera(width=width, height=height, fps=fps, device=device,
                                              fmt=pyvirtualcam.PixelFormat.BGR)
        except RuntimeError as error:
            raise SinkUnavailable(f"no virtual camera device ({error}). To fix: {virtual_camera_hint()}") from error
        self.width, self.height = width, height
        self.device = self.camera.device

    def write(self, frame: np.ndarray) -> None:
        self.camera.send(_fit(frame, self.width, self.height))

    def close(self) -> None:
        self.camera.close()


class WindowSink(FrameSink):
    """An OpenCV window. Keys: `p` types a new prompt (Enter sends, Esc cancels), `q` quits."""

    def __init__(self, title: str = "streamdiff"):
        self.title = title
        self.editor = PromptEditor()
        self.quit_requested = False
        self.submitted: list[str] = []
        try:
            cv2.namedWindow(title, cv2.WINDOW_NORMAL)
        except cv2.error as error:
            raise SinkUnavailable(
                "this OpenCV build has no GUI (opencv-python-headless); for --window install the GUI build: "
                "pip uninstall opencv-python-headless && pip install opencv-python") from error

    def write(self, frame: np.ndarray) -> None:
        shown = frame
        if self.editor.editing:
            shown = frame.copy()
            cv2.putText(shown, f"prompt: {self.editor.text}_", (8, shown.shape[0] - 10), cv2.FONT_HERSHEY_SIMPLEX,
                        0.5, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.imshow(self.title, shown)
        self.poll_keys()

    def poll_keys(self) -> None:
        """Handle pending key presses (call often: OpenCV only processes window events here)."""
        key = cv2.waitKey(1)
        if key < 0:
            return
        if not self.editor.editing and key in (ord("q"), 27):
            self.quit_requested = True
            return
        committed = self.editor.feed(key)
        if committed is not None:
            self.submitted.append(committed)

    def close(self) -> None:
        cv2.destroyWindow(self.title)
