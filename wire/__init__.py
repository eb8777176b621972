"""The WebSocket protocol's shared vocabulary: close codes, error codes and every message, for the server and
its clients alike (standard library only, so the clients install without the model stack).

A session, from the client's side (docs/server.md):
- the server's first message is a text `hello`;
- the client sends binary messages, each one encoded frame; the k-th binary message has sequence number k
  (counting from 0), and text control messages (`prompt`, `params`);
- every frame gets exactly one answer: a `frame` event immediately followed by the output JPEG, a `dropped`
  event (a newer frame replaced it), or an `error` event carrying its `seq`. Frame and error answers come in
  seq order; a `dropped` event may come as soon as its frame is replaced;
- `stats` events come about once a second; an `error` event without `seq` answers a control message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar

#: Close codes (RFC 6455 and one application code).
CLOSE_GOING_AWAY = 1001  # the server is shutting down (SIGTERM): reconnect, a proxy sends you to a live replica
CLOSE_POLICY_VIOLATION = 1008  # missing or wrong token
CLOSE_TOO_BIG = 1009  # a message over the size limit
CLOSE_TRY_AGAIN_LATER = 1013  # server full, or the model is not loaded yet
CLOSE_IDLE = 4408  # the session sent nothing for the server's idle timeout (an application code, after HTTP 408)
#: Close codes after which reconnecting cannot help: the same request would fail again.
FATAL_CLOSE_CODES = frozenset({CLOSE_POLICY_VIOLATION, CLOSE_TOO_BIG})
#: A close frame's reason may hold at most 123 bytes of UTF-8 (RFC 6455 §5.5).
MAX_CLOSE_REASON_BYTES = 123

# Error codes. The first five answer a frame (their events carry its `seq`); the others a control message.
EMPTY_FRAME = "empty_frame"
UNSUPPORTED_FORMAT = "unsupported_format"
BAD_IMAGE = "bad_image"
IMAGE_TOO_LARGE = "image_too_large"
INFERENCE_FAILED = "inference_failed"
#: The codes that answer a frame (the engine's `engine.codec.FRAME_ERROR_CODES`; a test holds them equal).
FRAME_ERROR_CODES = frozenset({EMPTY_FRAME, UNSUPPORTED_FORMAT, BAD_IMAGE, IMAGE_TOO_LARGE, INFERENCE_FAILED})
INVALID_JSON = "invalid_json"
INVALID_MESSAGE = "invalid_message"
UNKNOWN_MESSAGE_TYPE = "unknown_message_type"
PROMPT_TOO_LONG = "prompt_too_long"
INVALID_PARAMS = "invalid_params"
BUSY = "busy"


class WireError(ValueError):
    """A message that breaks the protocol (malformed JSON, a known event with missing or invalid fields)."""


def close_reason(text: str) -> str:
    """`text` cut to fit a close frame, without splitting a UTF-8 character."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


def close_is_fatal(code: int | None) -> bool:
    """Whether a close code means the same request would fail again (so do not reconnect)."""
    return code in FATAL_CLOSE_CODES


@dataclass(frozen=True)
class Event:
    """A server → client text event; `to_json` writes it with its `type` first."""

    type: ClassVar[str]

    def to_json(self) -> str:
        return json.dumps({"type": self.type, **asdict(self)})


@dataclass(frozen=True)
class Hello(Event):
    """The first message of every session: its id, the frame size, the in-flight limit, the model and its
    ControlNet (None without one)."""

    type: ClassVar[str] = "hello"
    session_id: str
    width: int
    height: int
    max_in_flight: int
    model: str
    controlnet: str | None = None


@dataclass(frozen=True)
class FrameEvent(Event):
    """Frame `seq`'s output follows as the next binary message.

    `latency_ms`: server side, frame received → answer sent; `skipped`: the similarity filter repeated the
    previous output instead of computing a new one.
    """

    type: ClassVar[str] = "frame"
    seq: int
    latency_ms: float
    skipped: bool


@dataclass(frozen=True)
class DroppedEvent(Event):
    """Frame `seq` was replaced by a newer one (latest wins) and gets no output."""

    type: ClassVar[str] = "dropped"
    seq: int


@dataclass(frozen=True)
class ErrorEvent(Event):
    """Bad input; the session goes on. With `seq`, it answers that frame (which gets no output)."""

    type: ClassVar[str] = "error"
    code: str
    message: str
    seq: int | None = None


@dataclass(frozen=True)
class StatsEvent(Event):
    """About every second while a session is active: recent fps and mean latencies (server side), and the
    session's counters since it began."""

    type: ClassVar[str] = "stats"
    fps: float
    latency_ms: float | None
    inference_ms: float | None
    frames_in: int
    frames_out: int
    dropped: int
    skipped: int
    errors: int
    in_flight: int


ServerEvent = Hello | FrameEvent | DroppedEvent | ErrorEvent | StatsEvent
_EVENTS: dict[str, type[Event]] = {kind.type: kind for kind in (Hello, FrameEvent, DroppedEvent, ErrorEvent,
                                                                StatsEvent)}
_FIELD_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "str": (str,), "bool": (bool,),
                                             "float": (int, float), "float | None": (int, float, type(None)),
                                             "int | None": (int, type(None)),
                                             "str | None": (str, type(None))}


def parse_event(text: str) -> ServerEvent | None:
    """Parse a server text event; `None` for an event type this client does not know (forward compatible).

    Raises:
        WireError: not a JSON object, or a known event with missing or mistyped fields.
    """
    try:
        message = json.loads(text)
    except ValueError as error:
        raise WireError(f"server sent invalid JSON: {error}") from error
    if not isinstance(message, dict):
        raise WireError(f"server event must be a JSON object, got {type(message).__name__}")
    kind = _EVENTS.get(message.get("type"))
    if kind is None:
        return None
    values: dict[str, Any] = {}
    for item in fields(kind):
        if item.name not in message:
            if item.default is not MISSING:
                continue
            raise WireError(f"{kind.type} event lacks {item.name!r}: {text[:200]}")
        value = message[item.name]
        allowed = _FIELD_TYPES[str(item.type)]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise WireError(f"{kind.type} event has {item.name}={value!r}, expected {item.type}")
        values[item.name] = value
    event = kind(**values)
    if isinstance(event, Hello) and min(event.width, event.height, event.max_in_flight) <= 0:
        raise WireError(f"hello has a non-positive size or limit: {text[:200]}")
    return event


def prompt_message(prompt: str, negative_prompt: str | None = None) -> str:
    """A `prompt` control message (the negative prompt only when given)."""
    message: dict[str, Any] = {"type": "prompt", "prompt": prompt}
    if negative_prompt is not None:
        message["negative_prompt"] = negative_prompt
    return json.dumps(message)


def blend_message(prompts: Sequence[tuple[str, float]], negative_prompt: str | None = None) -> str:
    """A `prompt` control message with a weighted prompt blend, `[[prompt, weight], ...]` (the server normalises
    the weights; the session's `prompt_blend` says how they blend)."""
    message: dict[str, Any] = {"type": "prompt", "prompts": [[text, weight] for text, weight in prompts]}
    if negative_prompt is not None:
        message["negative_prompt"] = negative_prompt
    return json.dumps(message)


def params_message(**params: Any) -> str:
    """A `params` control message for the server's hot parameters."""
    if "type" in params:
        raise ValueError("`type` is not a parameter")
    return json.dumps({"type": "params", **params})
