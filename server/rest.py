"""REST routes: health, sessions and their live prompt/parameters, MJPEG output, Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from .auth import require_token, require_token_or_query
from .health import DEGRADED, READY
from .protocol import ParamsUpdate, PromptUpdate, ProtocolError, check_prompt_length
from .sessions import Session
from .state import ServerState

logger = logging.getLogger(__name__)

#: MJPEG viewers per session; more get 503.
MAX_VIEWERS_PER_SESSION = 8
#: Seconds an MJPEG stream waits for a new frame before checking the session again.
MJPEG_POLL_S = 5.0
MJPEG_BOUNDARY = "frame"

# Routes are `async def` on purpose: they only read loop-owned state (sessions, events) and must not
# run in FastAPI's thread pool; anything slow (prompt encoding) goes to a worker thread explicitly.
router = APIRouter()


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def find_session(session_id: str, state: ServerState) -> Session:
    session = state.sessions.get(session_id)
    if session is None:
        raise HTTPException(status_code=404, detail=f"no session {session_id!r}")
    return session


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """`status` is loading, ready, degraded or error; HTTP 503 unless a new session would be accepted."""
    state = server_state(request)
    status = state.status()
    body = {
        "status": status,
        "model": state.model_name,
        "sessions": len(state.sessions),
        "max_sessions": state.settings.max_sessions,
        "accepting": state.accepting and status in (READY, DEGRADED),
        "width": state.settings.engine.width,
        "height": state.settings.engine.height,
    }
    if state.load_error is not None:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=200 if body["accepting"] else 503)


@router.get("/api/sessions", dependencies=[Depends(require_token)])
async def list_sessions(request: Request) -> dict:
    return {"sessions": [session.describe() for session in server_state(request).sessions]}


@router.post("/api/sessions/{session_id}/prompt", dependencies=[Depends(require_token)])
async def update_prompt(session_id: str, update: PromptUpdate, request: Request) -> dict:
    """Change a live session's prompt; the text encoder runs in a worker thread."""
    state = server_state(request)
    session = find_session(session_id, state)
    await _apply(session, update, state)
    return session.describe()


@router.patch("/api/sessions/{session_id}/params", dependencies=[Depends(require_token)])
async def update_params(session_id: str, update: ParamsUpdate, request: Request) -> dict:
    """Change a live session's hot parameters (all or none)."""
    state = server_state(request)
    session = find_session(session_id, state)
    await _apply(session, update, state)
    return session.describe()


async def _apply(session: Session, update: PromptUpdate | ParamsUpdate, state: ServerState) -> None:
    try:
        check_prompt_length(update, state.settings.max_prompt_chars)
        await session.update(update.engine_params())
    except (ProtocolError, ValueError) as error:
        raise HTTPException(status_code=422, detail=str(error)) from error


@router.get("/api/sessions/{session_id}/mjpeg", dependencies=[Depends(require_token_or_query)])
async def mjpeg(session_id: str, request: Request) -> StreamingResponse:
    """The session's output as `multipart/x-mixed-replace` JPEGs (an OBS media or browser source)."""
    session = find_session(session_id, server_state(request))
    if session.viewers >= MAX_VIEWERS_PER_SESSION:
        raise HTTPException(status_code=503, detail=f"{MAX_VIEWERS_PER_SESSION} viewers already watch this session")
    return StreamingResponse(_mjpeg_parts(session), media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
                             headers={"Cache-Control": "no-store"})


async def _mjpeg_parts(session: Session):
    """Each new output once; a slow viewer skips frames instead of queueing them."""
    session.viewers += 1
    try:
        seen = 0
        while not session.closed:
            frame = await session.next_frame(seen, MJPEG_POLL_S)
            if frame is None:
                continue
            seen, jpeg = frame
            yield (f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
                   + jpeg + b"\r\n")
    finally:
        session.viewers -= 1


@router.get("/metrics", dependencies=[Depends(require_token)])
async def metrics(request: Request) -> Response:
    state = server_state(request)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
