"""REST routes: health, sessions and their live prompt/parameters, MJPEG output, Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from wire import BUSY

from .auth import bearer_token_of, query_token_of, token_matches
from .protocol import MessageError, ParamsUpdate, PromptUpdate, parse_request_body
from .sessions import Session, UpdateRefused
from .state import ServerState

logger = logging.getLogger(__name__)

#: MJPEG viewers per session; more get 503.
MAX_VIEWERS_PER_SESSION = 8
#: Seconds an MJPEG stream waits for a new frame before checking the session again.
MJPEG_POLL_S = 5.0
MJPEG_BOUNDARY = "frame"

# Routes are `async def` on purpose: they only read loop-owned state (sessions, events) and must not
# run in FastAPI's thread pool; anything slow (prompt encoding) goes to a worker thread explicitly.
# Tokens, `Host` and body sizes are checked before any route runs (`server.guard`).
router = APIRouter()


def _json_body(model: type) -> dict:
    """OpenAPI description of a body the route parses itself (with the WebSocket's rules, `parse_request_body`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def find_session(session_id: str, state: ServerState) -> Session:
    session = state.sessions.get(session_id)
    if session is None:
        raise HTTPException(status_code=404, detail=f"no session {session_id!r}")
    return session


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """`status` is loading, ready, degraded or error; HTTP 503 unless a new session would be accepted.

    Public (load balancers probe it without a token), so a server with a token tells a caller without it
    the status and counts only: the model spec and a load error can hold local paths.
    """
    state = server_state(request)
    health = state.health()
    body: dict[str, object] = {
        "status": health.status,
        "sessions": len(state.sessions),
        "max_sessions": state.settings.max_sessions,
        "accepting": health.accepting,
    }
    if token_matches(state.settings.token, bearer_token_of(request.scope)) or token_matches(
            state.settings.token, query_token_of(request.scope)):
        body.update(model=state.model_name, width=state.settings.stream.width, height=state.settings.stream.height,
                    fps_in=round(health.fps_in, 3), fps_out=round(health.fps_out, 3))
        if health.failure is not None:
            body["error"] = health.failure
        if health.reason is not None:
            body["reason"] = health.reason
    return JSONResponse(body, status_code=200 if health.accepting else 503)


@router.get("/api/sessions")
async def list_sessions(request: Request) -> dict:
    return {"sessions": [session.describe() for session in server_state(request).sessions]}


@router.get("/api/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> dict:
    """One session: its prompt, parameters and counters (as in the list)."""
    return find_session(session_id, server_state(request)).describe()


@router.post("/api/sessions/{session_id}/prompt", openapi_extra=_json_body(PromptUpdate))
async def update_prompt(session_id: str, request: Request) -> dict:
    """Change a live session's prompt; the text encoder runs in a worker thread."""
    return await _apply(session_id, request, PromptUpdate)


@router.patch("/api/sessions/{session_id}/params", openapi_extra=_json_body(ParamsUpdate))
async def update_params(session_id: str, request: Request) -> dict:
    """Change a live session's hot parameters (all or none)."""
    return await _apply(session_id, request, ParamsUpdate)


async def _apply(session_id: str, request: Request, model: type) -> dict:
    state = server_state(request)
    session = find_session(session_id, state)
    try:
        update = parse_request_body(await request.body(), model, state.settings.max_prompt_chars)
        await session.update(update.engine_params())
    except MessageError as error:
        raise HTTPException(status_code=422, detail={"code": error.code, "message": error.message}) from error
    except UpdateRefused as error:
        raise HTTPException(status_code=429 if error.code == BUSY else 422,
                            detail={"code": error.code, "message": str(error)}) from error
    except ValueError as error:
        raise HTTPException(status_code=422, detail={"code": "invalid_params", "message": str(error)}) from error
    return session.describe()


class MjpegResponse(StreamingResponse):
    """A viewer's MJPEG stream; its viewer slot is released however the response ends, even unstarted."""

    def __init__(self, session: Session):
        super().__init__(_mjpeg_parts(session), media_type=f"multipart/x-mixed-replace; boundary={MJPEG_BOUNDARY}",
                         headers={"Cache-Control": "no-store"})
        self.session = session

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.session.viewers -= 1


@router.get("/api/sessions/{session_id}/mjpeg")
async def mjpeg(session_id: str, request: Request) -> StreamingResponse:
    """The session's output as `multipart/x-mixed-replace` JPEGs (an OBS media or browser source)."""
    session = find_session(session_id, server_state(request))
    if session.viewers >= MAX_VIEWERS_PER_SESSION:
        raise HTTPException(status_code=503, detail=f"{MAX_VIEWERS_PER_SESSION} viewers already watch this session")
    # Taken here, with no `await` between the check and the count, so concurrent viewers cannot all pass.
    session.viewers += 1
    return MjpegResponse(session)


async def _mjpeg_parts(session: Session):
    """Each new output once; a slow viewer skips frames instead of queueing them."""
    seen = 0
    while not session.closed:
        frame = await session.next_frame(seen, MJPEG_POLL_S)
        if frame is None:
            continue
        seen, jpeg = frame
        yield (f"--{MJPEG_BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
               + jpeg + b"\r\n")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = server_state(request)
    return Response(state.metrics.render(), media_type=state.metrics.content_type)
