"""The server's shared state: settings, metrics, sessions and the runtime, loaded in the background."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from engine import EngineConfig, ModelBundle, load_models
from engine.backends import NetworkRunner, make_runner, runner_name
from engine.codec import encode_jpeg
from engine.runtime import StreamRuntime
from engine.stream import resolve_device, resolve_dtype

from .health import ErrorClock, assess_health
from .metrics import ServerMetrics
from .sessions import SessionRegistry
from .settings import ServerSettings

logger = logging.getLogger(__name__)

#: Seconds after an inference error during which `/health` stays `degraded`.
ERROR_WINDOW_S = 30.0
class ModelLoadFailed(RuntimeError):
    """The configured model or backend could not be made ready."""


def prepare_models(config: EngineConfig) -> tuple[ModelBundle, NetworkRunner]:
    """Load `config.model`, move it to the configured device and dtype and build the backend's runner
    (exporting/compiling graphs when the backend needs them), logging each stage."""
    started = time.perf_counter()
    logger.info("loading model %r (tiny VAE: %s)", config.model, config.use_tiny_vae)
    models = load_models(config.model, use_tiny_vae=config.use_tiny_vae, taesd=config.taesd,
                         config=config.model_config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    logger.info("model %r loaded in %.1f s; moving to %s (%s)", models.name, time.perf_counter() - started,
                device, str(dtype).removeprefix("torch."))
    models.to(device, dtype)
    started = time.perf_counter()
    logger.info("preparing backend %r (VAE: %r)", config.backend, config.vae_backend or config.backend)
    runner = make_runner(models, config)
    logger.info("backend %s ready in %.1f s", runner_name(runner), time.perf_counter() - started)
    return models, runner


def warm_up(runtime: StreamRuntime, timeout: float = 300.0) -> float:
    """Run one grey frame through a throwaway stream so the first client is not the one who waits."""
    started = time.perf_counter()
    config = runtime.config
    handle = runtime.open_stream(max_in_flight=1)
    try:
        runtime.submit(handle, encode_jpeg(np.full((config.height, config.width, 3), 128, np.uint8)))
        result = handle.get(timeout)
        if result is None or result.error is not None:
            raise ModelLoadFailed(f"warm-up frame failed: {result.error.message if result else 'timed out'}")
    finally:
        runtime.close_stream(handle)
    return time.perf_counter() - started


class ServerState:
    """What every route and WebSocket handler shares.

    With `models` given the runtime starts at once; otherwise `start()` loads the configured model in
    a background thread and `/health` says `loading` until it is ready.
    """

    def __init__(self, settings: ServerSettings, models: ModelBundle | None = None):
        self.settings = settings
        self.metrics = ServerMetrics()
        self.sessions = SessionRegistry(settings.max_sessions, self.metrics, settings.replica_id)
        self.runtime: StreamRuntime | None = None
        self.model_name = settings.engine.model
        self.load_error: str | None = None
        #: Called (from the loader thread) when loading fails, e.g. to stop the process.
        self.on_load_failure: Callable[[str], None] | None = None
        self._models = models
        self._errors = ErrorClock()
        self._stopped = threading.Event()
        self._loader: threading.Thread | None = None

    def start(self) -> None:
        """Make the runtime ready: at once with given models, else in a background thread."""
        if self._models is not None:
            self.runtime = self._build_runtime(self._models)
            return
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _build_runtime(self, models: ModelBundle, runner: NetworkRunner | None = None) -> StreamRuntime:
        runtime = StreamRuntime(models, self.settings.engine, runner=runner, jpeg_quality=self.settings.jpeg_quality,
                                max_pixels=self.settings.max_pixels, max_batch=self.settings.max_batch,
                                batch_wait_s=self.settings.batch_wait_ms / 1000)
        self.model_name = models.name
        return runtime

    def _load(self) -> None:
        runtime = None
        try:
            runtime = self._build_runtime(*prepare_models(self.settings.engine))
            if self.settings.warmup:
                logger.info("warming up at %dx%d", self.settings.engine.width, self.settings.engine.height)
                logger.info("warm-up frame took %.1f s", warm_up(runtime))
        except Exception as error:  # any failure must surface in /health, not kill a thread silently
            if runtime is not None:
                runtime.close()
            self.load_error = f"{type(error).__name__}: {error}"
            logger.error("model loading failed: %s", self.load_error)
            if self.on_load_failure is not None:
                self.on_load_failure(self.load_error)
            return
        if self._stopped.is_set():
            runtime.close()
            return
        self.runtime = runtime
        logger.info("ready: model %r at %dx%d", self.model_name, self.settings.engine.width,
                    self.settings.engine.height)

    def status(self) -> str:
        """`loading`, `ready`, `degraded` or `error` (see `server.health.assess_health`)."""
        runtime = self.runtime
        since_error = None if runtime is None else self._errors.observe(runtime.health.inference_errors)
        now = time.monotonic()
        worst = None
        for session in self.sessions:
            latency = session.window.latency_s or 0.0
            worst = max(worst or 0.0, latency, session.behind_s(now))
        failure = self.load_error if runtime is None else runtime.failure
        return assess_health(runtime is not None, failure, since_error, worst,
                             error_window_s=ERROR_WINDOW_S, max_latency_s=self.settings.degraded_latency_s)

    @property
    def accepting(self) -> bool:
        """Whether a new session would be accepted now."""
        return self.runtime is not None and self.runtime.failure is None and self.sessions.has_room

    @property
    def failure(self) -> str | None:
        """Why the server cannot serve: the model failed to load, or a runtime thread died."""
        if self.load_error is not None:
            return f"model failed to load: {self.load_error}"
        runtime = self.runtime
        return None if runtime is None else runtime.failure

    def not_ready_reason(self) -> str:
        """Why sessions cannot start yet."""
        if self.failure is not None:
            return self.failure
        return "model is loading, try again shortly"

    def close(self) -> None:
        """Close every session and stop the runtime."""
        self._stopped.set()
        runtime = self.runtime
        if runtime is None:
            return
        for session in self.sessions:
            self.sessions.close(runtime, session)
        runtime.close()
        self.runtime = None
