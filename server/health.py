"""The server's health state (`loading`, `ready`, `degraded`, `error`) as pure decisions."""

from __future__ import annotations

import time
from dataclasses import dataclass

LOADING, READY, DEGRADED, ERROR = "loading", "ready", "degraded", "error"


def assess_health(loaded: bool, failure: str | None, seconds_since_inference_error: float | None,
                  worst_latency_s: float | None, *, error_window_s: float, max_latency_s: float) -> str:
    """The health state from what the server knows.

    `error` once loading failed or the runtime cannot serve (`failure`, e.g. a dead runtime thread), `loading`
    until the models are ready, then `degraded` while an inference error happened within `error_window_s` or
    a session's latency exceeds `max_latency_s`, else `ready`.
    """
    if failure is not None:
        return ERROR
    if not loaded:
        return LOADING
    if seconds_since_inference_error is not None and seconds_since_inference_error < error_window_s:
        return DEGRADED
    if worst_latency_s is not None and worst_latency_s > max_latency_s:
        return DEGRADED
    return READY


@dataclass
class ErrorClock:
    """Turns a growing error count into "seconds since the last new error"."""

    seen: int = 0
    last_change: float | None = None

    def observe(self, count: int, now: float | None = None) -> float | None:
        """Record the current count; seconds since it last grew, `None` if it never did."""
        now = time.monotonic() if now is None else now
        if count > self.seen:
            self.seen, self.last_change = count, now
        return None if self.last_change is None else now - self.last_change
