"""The server's shared state: settings, metrics, sessions and the engine's runtime, loaded in the background.

All engine work goes through the engine's contract (`engine.runtime.StreamRuntime`): this module only
decides when to load it and reports how it is doing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from engine.loading import Engine
from engine.runtime import RuntimeStatus, StreamRuntime

from .health import DEGRADED, DRAINING, ERROR, LOADING, READY, HealthReport, assess_health
from .metrics import ServerMetrics
from .sessions import SessionRegistry, UpdatePolicy
from .settings import ServerSettings

logger = logging.getLogger(__name__)

#: Seconds after an inference error during which `/health` stays `degraded`.
ERROR_WINDOW_S = 30.0


class ServerState:
    """What every route and WebSocket handler shares.

    With `engine` given (tests, benchmarks) the runtime starts at once; otherwise `start()` loads the
    configured model in a background thread and `/health` says `loading` until it is ready.
    """

    def __init__(self, settings: ServerSettings, engine: Engine | None = None):
        self.settings = settings
        self.sessions = SessionRegistry(settings.max_sessions, settings.replica_id,
                                        UpdatePolicy(settings.max_steps, settings.reprepare_interval_s))
        self.runtime: StreamRuntime | None = None
        self.metrics = ServerMetrics(lambda: None if self.runtime is None else self.runtime.status(),
                                     lambda: len(self.sessions))
        self.model_name = settings.load.model
        self.load_error: str | None = None
        #: Called (from the loader thread) when loading fails, e.g. to stop the process.
        self.on_load_failure: Callable[[str], None] | None = None
        self._engine = engine
        self._stopped = threading.Event()
        #: A second SIGTERM: exit at once (`server.serve.DrainingServer`).
        self.forced_exit = False
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        """Make the runtime ready: at once with a given engine, else in a background thread."""
        if self._engine is not None:
            self._ready(StreamRuntime(self._engine, self.settings.stream, self.settings.runtime))
            return
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        settings = self.settings
        started = time.perf_counter()
        try:
            runtime = StreamRuntime.load(settings.load, settings.stream, settings.runtime, warmup=settings.warmup)
        except Exception as error:  # any failure must surface in /health, not kill a thread silently
            self.load_error = f"{type(error).__name__}: {error}"
            logger.error("model loading failed: %s", self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure(self.load_error)
            return
        if self._stopped.is_set():
            runtime.close()
            return
        logger.info("loaded and warmed up in %.1f s", time.perf_counter() - started)
        self._ready(runtime)

    def _ready(self, runtime: StreamRuntime) -> None:
        self.runtime = runtime
        self.model_name = runtime.model_name
        logger.info("ready: model %r at %dx%d", self.model_name, self.settings.stream.width,
                    self.settings.stream.height)

    def health(self) -> HealthReport:
        """The health now, from one `runtime.status()` (see `server.health.assess_health`)."""
        runtime = self.runtime
        status = None if runtime is None else runtime.status()
        failure = self._failure(status)
        now = time.monotonic()
        since_error = None if status is None or status.last_error_at is None else now - status.last_error_at
        # Behind: the slowest session's recent latency, or how long the runtime's oldest frame has waited.
        worst = max((session.window.latency_s or 0.0 for session in self.sessions), default=None)
        if status is not None:
            worst = max(worst or 0.0, status.behind_s)
        state = assess_health(runtime is not None, failure, since_error, worst, error_window_s=ERROR_WINDOW_S,
                              max_latency_s=self.settings.degraded_latency_s)
        if self.sessions.draining and failure is None:
            state = DRAINING
        accepting = runtime is not None and failure is None and self.sessions.has_room and state in (READY, DEGRADED)
        reason = {ERROR: failure, LOADING: "the model is loading", DRAINING: "the server is shutting down"}.get(state)
        if state == DEGRADED and since_error is not None and since_error < ERROR_WINDOW_S:
            reason = f"an inference error {since_error:.0f} s ago ({status.last_error})"
        elif state == DEGRADED:
            reason = f"a session is {worst:.1f} s behind (over --degraded-latency {self.settings.degraded_latency_s:g})"
        return HealthReport(state, failure, accepting, 0.0 if status is None else status.fps_in,
                            0.0 if status is None else status.fps_out, reason)

    def _failure(self, status: RuntimeStatus | None) -> str | None:
        if self.load_error is not None:
            return f"model failed to load: {self.load_error}"
        return None if status is None else status.failure

    @property
    def failure(self) -> str | None:
        """Why the server cannot serve: the model failed to load, or a runtime thread died."""
        runtime = self.runtime
        return self._failure(None if runtime is None else runtime.status())

    async def drain(self, timeout_s: float) -> int:
        """Stop taking sessions (`/health` says `draining`), let every session answer its frames in flight and
        close (1001), for at most `timeout_s` seconds; returns how many sessions were still open then."""
        self.sessions.drain()
        deadline = time.monotonic() + timeout_s
        while len(self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return len(self.sessions)

    def not_ready_reason(self) -> str:
        """Why sessions cannot start yet."""
        if self.failure is not None:
            return self.failure
        return "model is loading, try again shortly"

    def close(self) -> None:
        """Close every session and stop the runtime (without waiting for its threads after a forced exit: they
        are daemons and may be inside a frame)."""
        self._stopped.set()
        runtime = self.runtime
        if runtime is None:
            return
        for session in self.sessions:
            self.sessions.close(session)
        runtime.close(timeout=0.0 if self.forced_exit else 10.0)
        self.runtime = None
