"""The optional bearer token: `Authorization: Bearer` on REST, `?token=` or a subprotocol on WebSockets.

`server.guard` enforces it on HTTP routes, the WebSocket handler on `/ws`.
"""

from __future__ import annotations

import secrets
from collections.abc import MutableMapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

Scope = MutableMapping[str, Any]

#: Subprotocol a client may offer next to `bearer.<token>` (browsers cannot set WebSocket headers).
SUBPROTOCOL = "streamdiff"
BEARER_SUBPROTOCOL_PREFIX = "bearer."


def token_matches(expected: str | None, given: str | None) -> bool:
    """Whether `given` is the configured token (always true when none is configured)."""
    if expected is None:
        return True
    return given is not None and secrets.compare_digest(expected.encode(), given.encode())


def websocket_credentials(query_token: str | None, offered: Sequence[str]) -> tuple[str | None, str | None]:
    """The token a WebSocket client presented and the subprotocol to accept.

    The token comes from `?token=` or an offered `bearer.<token>` subprotocol. The accepted subprotocol is
    `streamdiff` when offered, else the bearer one (a browser fails the handshake when the server picks none
    of the protocols it offered), else none.
    """
    bearer = next((item for item in offered if item.startswith(BEARER_SUBPROTOCOL_PREFIX)), None)
    token = query_token if query_token is not None else (bearer[len(BEARER_SUBPROTOCOL_PREFIX):] if bearer else None)
    if SUBPROTOCOL in offered:
        return token, SUBPROTOCOL
    return token, bearer


def header_of(scope: Scope, name: bytes) -> str | None:
    """A request header's value (ASGI scope; `name` in lowercase bytes), `None` when absent."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def bearer_token_of(scope: Scope) -> str | None:
    """The token of a request's `Authorization: Bearer <token>` header (ASGI scope)."""
    scheme, _, value = (header_of(scope, b"authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def query_token_of(scope: Scope) -> str | None:
    """A request's `?token=` query parameter (ASGI scope)."""
    query = scope.get("query_string", b"").decode("latin-1")
    return next((value for key, value in parse_qsl(query) if key == "token"), None)
