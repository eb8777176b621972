"""`python -m client.webcam`: camera, video file or synthetic pattern → server → window, virtual camera, file.

Keeps at most the server's `max_in_flight` frames unanswered (a live camera always sends its newest frame, so
latency never piles up), changes the prompt mid-stream from stdin lines or the window's `p` key, and reconnects
with backoff when the server restarts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .connection import ConnectionFailed, StreamConnection, connect_with_backoff
from .frames import decode_jpeg, encode_jpeg, fit_frame
from .pacing import next_due
from .prompt_input import follow_lines
from .protocol import http_base, parse_size
from .sinks import VCAM_INSTALL_HINT, FrameSink, SinkUnavailable, VideoFileSink, VirtualCameraSink, WindowSink
from .sources import SYNTHETIC, FrameSource, SourceUnavailable, open_source

logger = logging.getLogger("client.webcam")

EXIT_CONNECTION = 1
EXIT_DEVICE = 2
POLL_S = 0.25


@dataclass
class WebcamOptions:
    """Command-line options (see `build_parser` for their meaning)."""

    url: str = "ws://127.0.0.1:8000/ws"
    token: str | None = None
    source: str = "0"
    prompt: str | None = None
    negative_prompt: str | None = None
    size: tuple[int, int] | None = None
    fps: float | None = None
    frames: int | None = None
    duration: float | None = None
    window: bool = False
    vcam: bool = False
    vcam_device: str | None = None
    out: Path | None = None
    stdin: bool = True
    reconnect_attempts: int = 20
    stall_timeout: float = 10.0
    drain_timeout: float = 5.0


class WebcamClient:
    """Runs sessions (reconnecting as needed) until the frame/time bound, the source's end, or `q`."""

    def __init__(self, options: WebcamOptions, source: FrameSource, window: WindowSink | None = None):
        self.options = options
        self.source = source
        self.window = window
        self.sinks: list[FrameSink] = [window] if window else []
        self.vcam: VirtualCameraSink | None = None
        self.prompt = options.prompt
        self.prompts: asyncio.Queue[str] = asyncio.Queue()
        self.sent = 0
        self.written = 0
        self.source_ended = False
        self.deadline = math.inf

    @property
    def finished(self) -> bool:
        bound = self.options.frames
        quit_requested = self.window is not None and self.window.quit_requested
        return (bound is not None and self.written >= bound) or quit_requested or time.monotonic() >= self.deadline

    async def run(self) -> int:
        """Stream until done; returns the process exit code."""
        if self.options.duration is not None:
            self.deadline = time.monotonic() + self.options.duration
        if self.options.stdin:
            follow_lines(self.prompts, asyncio.get_running_loop())
        try:
            while not self.finished and not self.source_ended:
                try:
                    connection = await connect_with_backoff(
                        self.options.url, self.options.token, max_attempts=self.options.reconnect_attempts,
                        on_retry=lambda failure, delay: logger.warning("%s; retrying in %.1f s", failure, delay))
                except ConnectionFailed as failure:
                    logger.error("cannot stream: %s", failure)
                    return EXIT_CONNECTION
                try:
                    await self._session(connection)
                except ConnectionFailed as failure:
                    if not failure.retryable:
                        logger.error("the server ended the session: %s", failure)
                        return EXIT_CONNECTION
                    logger.warning("lost the server (%s); reconnecting", failure)
                finally:
                    await connection.close()
        except SinkUnavailable as error:
            logger.error("%s", error)
            return EXIT_DEVICE
        finally:
            for sink in self.sinks:
                sink.close()
        logger.info("done: %d frames sent, %d output frames written", self.sent, self.written)
        return 0

    async def _session(self, connection: StreamConnection) -> None:
        hello = connection.hello
        logger.info("session %s: %dx%d, up to %d frames in flight", hello.session_id, hello.width, hello.height,
                    hello.max_in_flight)
        logger.info("watch it in a browser or an OBS Browser Source: %s/view/%s%s", http_base(self.options.url),
                    hello.session_id, "?token=<token>" if self.options.token else "")
        self._open_sinks(hello.width, hello.height)
        if self.prompt:
            await connection.send_prompt(self.prompt, self.options.negative_prompt)
        sending = asyncio.create_task(self._send(connection))
        prompting = asyncio.create_task(self._forward_prompts(connection))
        try:
            await self._receive(connection, sending)
            if sending.done():
                sending.result()  # surface a failure of the sender
        finally:
            for task in (sending, prompting):
                task.cancel()
            await asyncio.gather(sending, prompting, return_exceptions=True)

    def _open_sinks(self, width: int, height: int) -> None:
        if self.options.vcam and self.vcam is None:
            self.vcam = VirtualCameraSink(width, height, self.options.fps or 30.0, self.options.vcam_device)
            logger.info("virtual camera: %s", self.vcam.device)
            self.sinks.append(self.vcam)
        if self.options.out is not None and not any(isinstance(sink, VideoFileSink) for sink in self.sinks):
            self.sinks.append(VideoFileSink(self.options.out, self.options.fps or self.source.fps or 30.0))

    def _sending_done(self, connection: StreamConnection) -> bool:
        bound = self.options.frames
        return self.finished or self.source_ended or (
            bound is not None and self.written + connection.outstanding >= bound)

    async def _send(self, connection: StreamConnection) -> None:
        width, height = self.options.size or (connection.hello.width, connection.hello.height)
        self.source.prefer_size(width, height)
        period = 1.0 / self.options.fps if self.options.fps else 0.0
        due = time.monotonic()
        while not self._sending_done(connection):
            # Wait for the slot first, then read: a live camera then sends its newest frame.
            if not await connection.wait_slot(timeout=POLL_S):
                continue
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(min(due - now, POLL_S))
                continue
            frame = await asyncio.to_thread(self.source.read)
            if frame is None:
                logger.info("the source has ended")
                self.source_ended = True
                return
            data = await asyncio.to_thread(_encode_frame, frame, width, height)
            await connection.send_frame(data)
            self.sent += 1
            due = next_due(due, period, time.monotonic())

    async def _receive(self, connection: StreamConnection, sending: asyncio.Task) -> None:
        last_progress = time.monotonic()
        drain_deadline = math.inf
        while True:
            if self.window is not None:
                self._take_window_prompts()
            if self.window_quit:
                return
            if sending.done():
                if connection.outstanding == 0:
                    return
                drain_deadline = min(drain_deadline, time.monotonic() + self.options.drain_timeout)
            if time.monotonic() >= drain_deadline:
                logger.warning("gave up waiting for %d output frame(s)", connection.outstanding)
                return
            try:
                output = await connection.next_output(timeout=POLL_S)
            except TimeoutError:
                if self.window is not None:
                    self.window.poll_keys()
                if connection.in_flight and time.monotonic() - last_progress > self.options.stall_timeout:
                    raise ConnectionFailed(f"no output for {self.options.stall_timeout:g} s", retryable=True) from None
                if not connection.in_flight:
                    last_progress = time.monotonic()
                continue
            last_progress = time.monotonic()
            image = decode_jpeg(output.jpeg)
            for sink in self.sinks:
                sink.write(image)
            self.written += 1

    @property
    def window_quit(self) -> bool:
        return self.window is not None and self.window.quit_requested

    def _take_window_prompts(self) -> None:
        while self.window.submitted:
            self.prompts.put_nowait(self.window.submitted.pop(0))

    async def _forward_prompts(self, connection: StreamConnection) -> None:
        while True:
            prompt = await self.prompts.get()
            self.prompt = prompt
            await connection.send_prompt(prompt, self.options.negative_prompt)
            logger.info("prompt: %s", prompt)


def _encode_frame(frame: np.ndarray, width: int, height: int) -> bytes:
    return encode_jpeg(fit_frame(frame, width, height))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.webcam", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the server's WebSocket URL")
    parser.add_argument("--token", default=None, help="bearer token, sent as ?token=")
    parser.add_argument("--source", default="0", help=f"camera index, video file, or {SYNTHETIC!r}")
    parser.add_argument("--prompt", default=None, help="the prompt to start with")
    parser.add_argument("--negative-prompt", default=None, help="the negative prompt")
    parser.add_argument("--size", type=parse_size, default=None, help="frame size to send, WxH (default: server's)")
    parser.add_argument("--fps", type=float, default=None, help="cap on frames sent per second")
    parser.add_argument("--frames", type=int, default=None, help="stop after this many output frames")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--window", action="store_true", help="show the output (keys: p = prompt, q = quit)")
    parser.add_argument("--vcam", action="store_true", help="send the output to a virtual camera (pyvirtualcam)")
    parser.add_argument("--vcam-device", default=None, help="virtual camera device, e.g. /dev/video10")
    parser.add_argument("--out", type=Path, default=None, help="write the output to a video file (.mp4 or .avi)")
    parser.add_argument("--no-stdin", dest="stdin", action="store_false", help="do not read prompts from stdin")
    parser.add_argument("--reconnect-attempts", type=int, default=20, help="connection attempts before giving up")
    return parser


def parse_options(argv: list[str] | None = None) -> WebcamOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("frames", "duration", "fps"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive")
    if args.reconnect_attempts < 1:
        parser.error("--reconnect-attempts must be at least 1")
    return WebcamOptions(**vars(args))


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if options.vcam:
        try:
            import pyvirtualcam  # noqa: F401  (fail before connecting when the package is missing)
        except ImportError:
            logger.error("--vcam needs pyvirtualcam: %s", VCAM_INSTALL_HINT)
            return EXIT_DEVICE
    if not (options.window or options.vcam or options.out):
        logger.info("no local output (--window, --vcam, --out): watch the stream at the printed /view URL")
    width, height = options.size or (512, 512)
    try:
        window = WindowSink() if options.window else None
        source = open_source(options.source, width, height)
    except (SourceUnavailable, SinkUnavailable) as error:
        logger.error("%s", error)
        return EXIT_DEVICE
    try:
        return asyncio.run(WebcamClient(options, source, window).run())
    except KeyboardInterrupt:
        return 0
    finally:
        source.close()


if __name__ == "__main__":
    sys.exit(main())
