"""Running the app under uvicorn: in the foreground (`python -m server`) or in a background thread."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn
import uvicorn.config
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from engine.runtime import MODEL_THREADS

from .settings import ServerSettings

logger = logging.getLogger(__name__)

#: Protocol-level WebSocket limit above `max_message_bytes`: messages slightly over the limit reach the
#: handler, which closes with 1009 and a clear reason; far larger ones are refused (also 1009) before
#: they are buffered.
WS_SIZE_SLACK = 64 * 1024


_TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"']*")


def redact_token(text: str) -> str:
    """`text` with every `token=` query value replaced by `[redacted]`."""
    return _TOKEN_IN_URL.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Removes `?token=` values from log records (uvicorn's access and WebSocket lines print whole URLs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_token(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_token(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def log_config() -> dict:
    """uvicorn's logging configuration with `RedactTokens` on its loggers (so on every handler they reach)."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": RedactTokens}
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        config["loggers"].setdefault(name, {}).setdefault("filters", []).append("redact_tokens")
    return config


def guarded_http_protocol(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing connections that are over `max_connections` or slow with headers.

    uvicorn arms its keep-alive timer only after a first response, so a client that opens a connection and
    never finishes its request headers holds a file descriptor for ever; a thousand such clients lock
    everyone out. Here each request must finish its headers within `header_timeout_s` of its first byte (or
    of the connection's opening), and connections past `max_connections` are closed as soon as they open.
    """

    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                logger.warning("refusing a connection: %d are open (--max-connections)", len(self.connections) - 1)
                transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._disarm_header_timer()
            super().on_headers_complete()

        def handle_websocket_upgrade(self) -> None:
            self._disarm_header_timer()
            super().handle_websocket_upgrade()

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            logger.debug("closing a connection whose request headers took over %g s", header_timeout_s)
            self.transport.close()

    return GuardedHttpProtocol


def uvicorn_config(app: FastAPI, settings: ServerSettings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration for `app` under `settings` (`overrides` win)."""
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="on",
                   ws_max_size=settings.max_message_bytes + WS_SIZE_SLACK, ws_max_queue=8,
                   http=guarded_http_protocol(settings.header_timeout_s, settings.max_connections),
                   log_config=log_config())
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
