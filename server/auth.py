"""The optional bearer token: `Authorization: Bearer` on REST, `?token=` or a subprotocol on WebSockets."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from fastapi import HTTPException, Request

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


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def require_token(request: Request) -> None:
    """FastAPI dependency: 401 unless the request carries the configured bearer token."""
    expected = request.app.state.server.settings.token
    if not token_matches(expected, bearer_token(request)):
        raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


def require_token_or_query(request: Request) -> None:
    """Like `require_token`, also accepting `?token=` (for media URLs that cannot send headers, e.g. OBS)."""
    expected = request.app.state.server.settings.token
    if not (token_matches(expected, bearer_token(request))
            or token_matches(expected, request.query_params.get("token"))):
        raise HTTPException(status_code=401, detail="missing or invalid token",
                            headers={"WWW-Authenticate": "Bearer"})
