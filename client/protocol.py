"""Pure pieces of the server's WebSocket protocol (issue 3): URLs, messages, events, backoff, close codes.

Server → client text events are `hello` (first), `stats` and `error`; binary messages are JPEG outputs, one per
accepted frame, in order. Client → server: binary encoded frames and text `prompt` / `params` messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Close codes the server uses (RFC 6455): 1009 message too big, 1013 try again later (server full).
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_FULL = 1013
#: Close codes after which reconnecting cannot help: policy violation (e.g. a bad token), message too big.
FATAL_CLOSE_CODES = frozenset({1008, CLOSE_TOO_BIG})


class ProtocolError(ValueError):
    """The server sent something the protocol does not allow."""


@dataclass(frozen=True)
class Hello:
    """The server's first message: the session and the engine's frame size and in-flight limit."""

    session_id: str
    width: int
    height: int
    max_in_flight: int


@dataclass(frozen=True)
class Stats:
    """A `stats` event; `dropped` is the session's count of frames replaced by newer ones (latest wins)."""

    dropped: int
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorEvent:
    """An `error` event for bad input; the stream goes on."""

    code: str
    message: str


ServerEvent = Hello | Stats | ErrorEvent


def with_token(url: str, token: str | None) -> str:
    """`url` with `?token=` set (replacing any token already there); unchanged when `token` is empty."""
    if not token:
        return url
    parts = urlsplit(url)
    query = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query)))


def http_base(ws_url: str) -> str:
    """The HTTP origin of a WebSocket URL (`ws://h:p/ws` → `http://h:p`), for `/health` and `/metrics`."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"`url` must start with ws:// or wss://, got {ws_url!r}")
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def prompt_message(prompt: str, negative_prompt: str | None = None) -> str:
    """A `prompt` control message (the negative prompt only when given)."""
    message: dict = {"type": "prompt", "prompt": prompt}
    if negative_prompt is not None:
        message["negative_prompt"] = negative_prompt
    return json.dumps(message)


def params_message(**params: object) -> str:
    """A `params` control message for the server's hot parameters."""
    if "type" in params:
        raise ValueError("`type` is not a parameter")
    return json.dumps({"type": "params", **params})


def parse_event(text: str) -> ServerEvent | None:
    """Parse a server text event; `None` for event types this client does not know (forward compatible).

    Raises:
        ProtocolError: not a JSON object, or a known event with missing/invalid fields.
    """
    try:
        message = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProtocolError(f"server sent invalid JSON: {error}") from error
    if not isinstance(message, dict):
        raise ProtocolError(f"server event must be a JSON object, got {type(message).__name__}")
    kind = message.get("type")
    try:
        if kind == "hello":
            hello = Hello(str(message["session_id"]), int(message["width"]), int(message["height"]),
                          int(message["max_in_flight"]))
            if hello.width <= 0 or hello.height <= 0 or hello.max_in_flight <= 0:
                raise ProtocolError(f"hello has non-positive size or limit: {message}")
            return hello
        if kind == "stats":
            return Stats(int(message.get("dropped", 0)), message)
        if kind == "error":
            return ErrorEvent(str(message["code"]), str(message.get("message", "")))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, ProtocolError):
            raise
        raise ProtocolError(f"malformed {kind} event {message}: {error!r}") from error
    return None


def backoff_delays(initial: float = 0.5, factor: float = 2.0, maximum: float = 10.0) -> Iterator[float]:
    """Endless reconnect delays: `initial`, growing by `factor`, capped at `maximum`."""
    if initial <= 0 or factor < 1 or maximum < initial:
        raise ValueError(f"need 0 < `initial` <= `maximum` and `factor` >= 1, got {initial}, {factor}, {maximum}")
    delay = initial
    while True:
        yield delay
        delay = min(delay * factor, maximum)


def close_is_fatal(code: int | None) -> bool:
    """Whether a close code means the same request would fail again (so do not reconnect)."""
    return code in FATAL_CLOSE_CODES


def parse_size(text: str) -> tuple[int, int]:
    """`"WxH"` → `(W, H)`."""
    width, sep, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = (0, 0)
    if not sep or size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"size must look like 640x480, got {text!r}")
    return size
