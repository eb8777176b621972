"""Running the app under uvicorn: in the foreground (`python -m server`) or in a background thread."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn
from fastapi import FastAPI

from engine.runtime import MODEL_THREADS

from .settings import ServerSettings

#: Protocol-level WebSocket limit above `max_message_bytes`: messages slightly over the limit reach the
#: handler, which closes with 1009 and a clear reason; far larger ones are refused (also 1009) before
#: they are buffered.
WS_SIZE_SLACK = 64 * 1024


def uvicorn_config(app: FastAPI, settings: ServerSettings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration for `app` under `settings` (`overrides` win)."""
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="on",
                   ws_max_size=settings.max_message_bytes + WS_SIZE_SLACK, ws_max_queue=8)
    options.update(overrides)
    return uvicorn.Config(app, **options)


@contextmanager
def background_server(app: FastAPI, settings: ServerSettings, startup_timeout: float = 60.0,
                      **overrides) -> Iterator[str]:
    """Run `app` in a daemon thread; yields its base URL (`http://host:port`), stops it on exit.

    With `port=0` in `settings` the OS picks a free port.
    """
    server = uvicorn.Server(uvicorn_config(app, settings, **overrides))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(startup_timeout)


def configure_logging(level: str) -> None:
    """Timestamped logs for the server and engine at `level`."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def configure_threads(threads: int) -> int:
    """Set torch's intra-op threads (process-wide) and return the count in use.

    0 shares torch's default (one per core) among the runtime's model threads, at least one each: with
    more OpenMP threads than cores, threads that wait for a descheduled peer spin and slow every stage.
    Call it once, at start-up, before torch's count has been changed.
    """
    torch.set_num_threads(threads or max(1, torch.get_num_threads() // MODEL_THREADS))
    return torch.get_num_threads()
