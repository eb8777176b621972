"""The server's health state (`loading`, `ready`, `degraded`, `error`) as pure decisions."""

from __future__ import annotations

from dataclasses import dataclass

LOADING, READY, DEGRADED, ERROR, DRAINING = "loading", "ready", "degraded", "error", "draining"


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


@dataclass(frozen=True)
class HealthReport:
    """What `/health` says, from one look at the runtime (`ServerState.health`).

    Args:
        status (`str`): `loading`, `ready`, `degraded` or `error`.
        failure (`str | None`): why the server cannot serve, when it cannot.
        accepting (`bool`): whether a new session would be accepted now.
        fps_in (`float`): frames taken in per second, over every stream (the runtime's window).
        fps_out (`float`): outputs per second, over every stream.
        reason (`str | None`): why the status is not `ready` (None when it is).
    """

    status: str
    failure: str | None
    accepting: bool
    fps_in: float
    fps_out: float
    reason: str | None = None
