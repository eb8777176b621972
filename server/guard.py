"""The edge of the app: every request's `Host`, `Origin`, token and body size are checked before any route runs.

One pure-ASGI middleware, so a refused request costs nothing: the token is checked before a body is read,
and a body over `max_control_bytes` is refused (413) without being buffered. Which routes need what is one
pure function, `access_rule`; a route not listed there needs the bearer token.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal
from urllib.parse import urlsplit

from .auth import Scope, bearer_token_of, header_of, query_token_of, token_matches
from .settings import ServerSettings

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

AccessRule = Literal["public", "token_or_query", "token"]
#: Paths anyone may fetch: the page, its assets and the health probe (load balancers call it without a token).
_PUBLIC_PATHS = frozenset({"/", "/health", "/favicon.ico"})
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def access_rule(path: str) -> AccessRule:
    """What an HTTP request to `path` must present.

    `public`: nothing. `token_or_query`: the bearer token or `?token=` (media URLs for OBS, which cannot send
    headers). `token`: `Authorization: Bearer` — everything else, `/openapi.json` and unknown paths included,
    so a route added later is protected unless listed here.
    """
    if path in _PUBLIC_PATHS or path.startswith("/static/"):
        return "public"
    parts = path.strip("/").split("/")
    if (len(parts) == 2 and parts[0] == "view") or (len(parts) == 4 and parts[:2] == ["api", "sessions"]
                                                     and parts[3] == "mjpeg"):
        return "token_or_query"
    return "token"


def split_host(value: str) -> tuple[str, int | None]:
    """`host[:port]` (IPv6 in brackets) as a lowercase name and a port; `("", None)` when unparseable."""
    try:
        parts = urlsplit(f"//{value.strip()}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


def host_allowed(host_header: str, allowed: frozenset[str] | None) -> bool:
    """Whether the `Host` header names this server (`allowed` None: any name)."""
    if allowed is None:
        return True
    name, _ = split_host(host_header)
    return name in allowed


def origin_allowed(origin: str | None, host_header: str, extra_origins: tuple[str, ...]) -> bool:
    """Whether a browser page from `origin` may open a WebSocket here.

    A client that sends no `Origin` (scripts, OBS, the CLI clients) is not a browser page and is welcome.
    A page must come from this server itself (same host and port as the `Host` it connected to) or from one
    of `extra_origins` (`--cors-origins`); otherwise any site the user visits could stream on their server.
    """
    if origin is None:
        return True
    if origin.rstrip("/") in {allowed.rstrip("/") for allowed in extra_origins}:
        return True
    try:
        parts = urlsplit(origin)
        origin_port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        origin_name = (parts.hostname or "").lower()
    except ValueError:
        return False
    host_name, host_port = split_host(host_header)
    return bool(origin_name) and origin_name == host_name and origin_port == (host_port or _DEFAULT_PORTS.get(
        parts.scheme))


async def _respond(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class EdgeGuard:
    """ASGI middleware enforcing `Host`, `Origin`, token and body-size rules (see the module docstring).

    Args:
        app: the wrapped ASGI app.
        settings (`ServerSettings`): token, allowed hosts, CORS origins and `max_control_bytes`.
    """

    def __init__(self, app: ASGIApp, settings: ServerSettings):
        self.app = app
        self.settings = settings
        self.host_names = settings.host_names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = header_of(scope, b"host") or ""
        if not host_allowed(host, self.host_names):
            await self._refuse(scope, receive, send, 400, f"unknown Host {host!r}; see --allowed-hosts")
            return
        if scope["type"] == "websocket":
            # The token is the WebSocket handler's to check: only a close frame after accepting can say why.
            if not origin_allowed(header_of(scope, b"origin"), host, self.settings.cors_origins):
                await self._refuse(scope, receive, send, 403, "cross-origin WebSocket refused")
                return
            await self.app(scope, receive, send)
            return
        rule = access_rule(scope["path"])
        expected = self.settings.token
        if rule != "public" and not (token_matches(expected, bearer_token_of(scope)) or (
                rule == "token_or_query" and token_matches(expected, query_token_of(scope)))):
            await _respond(send, 401, "missing or invalid token", [(b"www-authenticate", b"Bearer")])
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send)
        if body is not None:
            await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole request body, or `None` after answering 413 when it exceeds `max_control_bytes`."""
        limit = self.settings.max_control_bytes
        declared = header_of(scope, b"content-length")
        too_big = f"request body over the limit of {limit} bytes (--max-control-size)"
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _respond(send, 413, too_big, [(b"connection", b"close")])
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _respond(send, 413, too_big, [(b"connection", b"close")])
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            # Closing before accepting makes the server answer the handshake with HTTP 403.
            await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
            return
        await _respond(send, status, detail)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that yields the already-read body once, then waits for the client as usual."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
