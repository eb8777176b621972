"""Helpers for the server tests: frames, a reference engine, and a bounded WebSocket stream driver."""

from __future__ import annotations

import asyncio
import io
import json
import time
from dataclasses import dataclass, field

import numpy as np
import websockets
from PIL import Image

from client.patterns import moving_pattern
from engine import Engine, LoadConfig, RuntimeOptions, StreamConfig, StreamEngine
from engine.codec import decode_image, encode_jpeg, rgb_to_tensor, tensor_to_rgb
from server.settings import ServerSettings
from server.state import ServerState

RECV_TIMEOUT_S = 60.0

# The tiny model with the full (random) AutoencoderKL instead of the random TAESD: with TAESD the tiny model's
# output barely depends on the input or prompt, so order, isolation and prompt changes would be invisible.
TEST_LOAD = LoadConfig(model="tiny", vae="full", backend="eager")
# 64x64, similarity filter off: every accepted frame is computed, so counts and outputs are deterministic.
TEST_STREAM = StreamConfig(width=64, height=64, similarity_filter=False)
TEST_SETTINGS = ServerSettings(
    load=TEST_LOAD, stream=TEST_STREAM, runtime=RuntimeOptions(max_pixels=256 * 256), port=0, max_sessions=3,
    max_in_flight=2, max_message_bytes=256 * 1024, max_prompt_chars=200, stats_interval_s=0.2, log_level="warning",
)


@dataclass
class LiveServer:
    """A running server: its URLs and its in-process state (for leak checks)."""

    base_url: str
    settings: ServerSettings
    state: ServerState

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/ws"


def encode(rgb: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=fmt)
    return buffer.getvalue()


def frame(index: int, size: int = 64, fmt: str = "JPEG") -> bytes:
    """Frame `index` of a moving pattern, encoded."""
    return encode(moving_pattern(index, size, size), fmt)


def random_frame(seed: int, size: int = 64) -> bytes:
    """A frame unlike any other seed's, so a swapped output cannot pass for the right one."""
    return encode(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), "PNG")


def decode(jpeg: bytes) -> np.ndarray:
    assert jpeg[:2] == b"\xff\xd8", "not a JPEG"
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.int16)


def reference_outputs(engine: Engine, config: StreamConfig, frames: list[bytes]) -> list[np.ndarray]:
    """What the server must answer for `frames` on a fresh stream: the engine run in-process, same codecs."""
    stream = StreamEngine(engine, config)
    outputs = []
    for data in frames:
        rgb = decode_image(data, config.width, config.height)
        outputs.append(decode(encode_jpeg(tensor_to_rgb(stream.step(rgb_to_tensor(rgb)).images))))
    return outputs


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@dataclass
class StreamLog:
    """What a client received: output JPEGs in order with their `frame` events, and the other text events."""

    outputs: list[bytes] = field(default_factory=list)
    frames: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    def of_type(self, kind: str) -> list[dict]:
        return [event for event in self.events if event["type"] == kind]

    def answered_seqs(self) -> list[int]:
        """The seq of every answer received (frames, drops and frame errors)."""
        return sorted(event["seq"] for event in self.events + self.frames if event.get("seq") is not None)


async def hello(ws) -> dict:
    message = json.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))
    assert message["type"] == "hello", message
    return message


async def stream(ws, frames: list[bytes], max_in_flight: int, log: StreamLog | None = None) -> StreamLog:
    """Send `frames` keeping at most `max_in_flight` unanswered; wait for one answer each (a `frame` event and its
    JPEG, a `dropped` event or an `error` event with the frame's seq). Every `frame` event must be followed by
    its JPEG."""
    log = log if log is not None else StreamLog()
    answered, sent = 0, 0
    deadline = time.monotonic() + RECV_TIMEOUT_S * max(1, len(frames) // 4)
    announced: dict | None = None
    while answered < len(frames):
        while sent < len(frames) and sent - answered < max_in_flight:
            await ws.send(frames[sent])
            sent += 1
        message = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        if isinstance(message, bytes):
            assert announced is not None, "a JPEG came without a `frame` event before it"
            log.outputs.append(message)
            log.frames.append(announced)
            announced = None
            answered += 1
            continue
        assert announced is None, f"expected the JPEG of {announced}, got {message[:200]!r}"
        event = json.loads(message)
        if event["type"] == "frame":
            announced = event
            continue
        log.events.append(event)
        if event["type"] == "dropped" or (event["type"] == "error" and event.get("seq") is not None):
            answered += 1
    return log


async def next_event(ws, kind: str, log: StreamLog | None = None) -> dict:
    """The next text event of type `kind` (frames and other events in between are kept in `log`)."""
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while True:
        message = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        if isinstance(message, bytes):
            if log is not None:
                log.outputs.append(message)
            continue
        event = json.loads(message)
        if event["type"] == kind:
            return event
        if log is not None:
            log.events.append(event)


def connect(ws_url: str, **options):
    return websockets.connect(ws_url, open_timeout=30, close_timeout=5, **options)


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll `predicate` until true (bounded); fail the test on time-out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)
