"""Client-side helpers around the WebSocket protocol: URLs, reconnect backoff, frame sizes.

The protocol itself (events, close codes, error codes, control messages) is `wire`'s, shared with the server.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit


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


def backoff_delays(initial: float = 0.5, factor: float = 2.0, maximum: float = 10.0) -> Iterator[float]:
    """Endless reconnect delays: `initial`, growing by `factor`, capped at `maximum`."""
    if initial <= 0 or factor < 1 or maximum < initial:
        raise ValueError(f"need 0 < `initial` <= `maximum` and `factor` >= 1, got {initial}, {factor}, {maximum}")
    delay = initial
    while True:
        yield delay
        delay = min(delay * factor, maximum)


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
