"""Running the app under uvicorn: in the foreground (`python -m server`) or in a background thread."""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import unquote_plus

import torch
import uvicorn
import uvicorn.config
from fastapi import FastAPI

from engine.runtime import MODEL_THREADS

from .connections import guarded_http_protocol, guarded_websocket_protocol
from .settings import ServerSettings
from .state import ServerState

logger = logging.getLogger(__name__)

#: Protocol-level WebSocket limit above `max_message_bytes`: messages slightly over the limit reach the
#: handler, which closes with 1009 and a clear reason; far larger ones are refused (also 1009) before
#: they are buffered.
WS_SIZE_SLACK = 64 * 1024
#: Seconds a WebSocket connection may take to end after the server's close frame (or the app's end) before
#: it is aborted.
WS_CLOSE_TIMEOUT_S = 5.0


#: A query parameter inside a logged URL: its key and value.
_QUERY_PARAM = re.compile(r"([?&])([^=&\s\"'#]*)=([^&\s\"'#]*)")


def redact_token(text: str) -> str:
    """`text` with the value of every query parameter whose key decodes to `token` replaced by `[redacted]`.

    Keys are decoded as the server decodes them (`?%74oken=` authenticates like `?token=`), so each spelling
    of the key is redacted.
    """

    def redact(match: re.Match) -> str:
        separator, key, _ = match.groups()
        return f"{separator}{key}=[redacted]" if unquote_plus(key) == "token" else match.group(0)

    return _QUERY_PARAM.sub(redact, text)


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


#: Of `--shutdown-timeout`, the seconds left to uvicorn's own shutdown (closing connections, waiting for tasks)
#: after the drain.
UVICORN_SHUTDOWN_S = 2.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining on the first SIGTERM or SIGINT before it stops.

    The first signal drains (`ServerState.drain`: no new sessions, `/health` says `draining` so a load balancer
    sends new clients elsewhere, frames in flight answered, every session closed with 1001) for at most
    `shutdown_timeout_s` less uvicorn's own `UVICORN_SHUTDOWN_S`, then lets uvicorn shut down. A second signal
    exits at once.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout_s: float):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = max(0.5, shutdown_timeout_s - UVICORN_SHUTDOWN_S)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining or self._loop is None or not self.started:
            if self._draining:
                logger.warning("a second %s: exiting now", signal.Signals(sig).name)
                self.force_exit = True
                self.state.forced_exit = True
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self._captured_signals.append(sig)
        logger.info("%s: draining (at most %.1f s), then shutting down", signal.Signals(sig).name,
                    self.drain_timeout_s)
        asyncio.run_coroutine_threadsafe(self._drain(), self._loop)

    async def _drain(self) -> None:
        left = await self.state.drain(self.drain_timeout_s)
        if left:
            logger.warning("%d session(s) still open after the drain; closing them", left)
        self.should_exit = True


def uvicorn_config(app: FastAPI, settings: ServerSettings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration for `app` under `settings` (`overrides` win)."""
    # No permessage-deflate: frames are JPEG and gain nothing from it, and every message it would inflate is
    # work (8 MiB from an 8 kB message) done on the event loop before any limit of ours sees it.
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="on",
                   timeout_graceful_shutdown=UVICORN_SHUTDOWN_S,
                   ws_max_size=settings.max_message_bytes + WS_SIZE_SLACK, ws_max_queue=8,
                   ws_per_message_deflate=False,
                   http=guarded_http_protocol(settings.header_timeout_s, settings.max_connections),
                   ws=guarded_websocket_protocol(WS_CLOSE_TIMEOUT_S), log_config=log_config())
    options.update(overrides)
    return uvicorn.Config(app, **options)


@contextmanager
def background_server(app: FastAPI, settings: ServerSettings, startup_timeout: float = 60.0,
                      **overrides) -> Iterator[str]:
    """Run `app` in a daemon thread; yields its base URL (`http://host:port`), stops it on exit.

    With `port=0` in `settings` the OS picks a free port.
    """
    server = DrainingServer(uvicorn_config(app, settings, **overrides), app.state.server, settings.shutdown_timeout_s)
    with serving_in_thread(server, startup_timeout) as base_url:
        yield base_url


@contextmanager
def serving_in_thread(server: uvicorn.Server, startup_timeout: float = 60.0) -> Iterator[str]:
    """Run `server` in a daemon thread; yields its base URL once it listens, stops it (if still running) on exit."""
    thread = threading.Thread(target=server.run, name=f"uvicorn-{id(server):x}", daemon=True)
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
