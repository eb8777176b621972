"""`create_app`: the FastAPI application of one server process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from engine.loading import Engine

from .guard import EdgeGuard
from .rest import find_session, router
from .settings import ServerSettings
from .state import ServerState
from .ws import websocket_stream

STATIC_DIR = Path(__file__).parent / "static"


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    """The app for `settings`.

    Args:
        settings (`ServerSettings`): limits, token, allowed hosts and origins, and the engine configuration.
        engine (`Engine`, *optional*): an already loaded engine (tests, benchmarks); without it the configured
            model loads in a background thread at startup and `/health` says `loading` meanwhile.
    """
    state = ServerState(settings, engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            state.close()

    # No /docs or /redoc: they load their assets from a CDN and the server must work offline.
    app = FastAPI(title="streamdiff server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(EdgeGuard, settings=settings)
    if settings.cors_origins:
        # Outside the guard: a CORS preflight carries no token and must be answered before the token check.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST", "PATCH"], allow_headers=["Authorization", "Content-Type"])
    app.include_router(router)
    app.add_api_websocket_route("/ws", websocket_stream)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        """The browser webcam filter."""
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/view/{session_id}", include_in_schema=False)
    async def viewer(session_id: str, request: Request) -> FileResponse:
        """A page showing one session's output full-window (an OBS Browser Source)."""
        find_session(session_id, request.app.state.server)
        return FileResponse(STATIC_DIR / "view.html")

    # StaticFiles resolves paths inside its folder only, so `..` cannot escape it.
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
