"""Pure statistics for the clients: percentiles, delivered FPS, per-stream and total reports, ramp verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES: tuple[int, ...] = (50, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0–100) of `values` with linear interpolation between closest ranks
    (numpy's default method); `nan` for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"`q` must be within [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lower = math.floor(rank)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (rank - lower)


def latency_summary_ms(latencies_s: Sequence[float]) -> dict[str, float]:
    """`{"p50", "p95", "p99"}` in milliseconds of latencies given in seconds (`nan` when there are none)."""
    return {f"p{q}": percentile(latencies_s, q) * 1000.0 for q in PERCENTILES}


def delivered_fps(frames: int, seconds: float) -> float:
    """Frames per second over a window; 0 for an empty window."""
    if frames < 0:
        raise ValueError(f"`frames` must be >= 0, got {frames}")
    return frames / seconds if seconds > 0 else 0.0


@dataclass
class StreamReport:
    """What one stream measured.

    Args:
        index: the stream's number (0-based).
        sent: frames sent.
        received: output frames received (including those drained after the window closed).
        in_window: output frames received inside the measuring window (what FPS counts).
        dropped: frames the server reported as dropped (its `stats` events).
        errors: `error` events plus failed or broken connections.
        latencies_s: end-to-end latency of each output, send → receive, in seconds.
        session_ids: the server's session id(s) of this stream (more than one after a reconnect).
    """

    index: int
    sent: int = 0
    received: int = 0
    in_window: int = 0
    dropped: int = 0
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)

    def fps(self, duration_s: float) -> float:
        return delivered_fps(self.in_window, duration_s)


@dataclass(frozen=True)
class RunSummary:
    """Totals over all streams of one run; `per_stream_fps` sums to `total_fps`."""

    streams: int
    duration_s: float
    sent: int
    received: int
    dropped: int
    errors: int
    total_fps: float
    per_stream_fps: list[float]
    latency_ms: dict[str, float]

    def as_json(self) -> dict:
        """The load tester's JSON keys (NaN latencies become null so the file stays valid JSON)."""
        return {
            "streams": self.streams,
            "duration_s": self.duration_s,
            "total_fps": self.total_fps,
            "per_stream_fps": list(self.per_stream_fps),
            "latency_ms": {key: (None if math.isnan(value) else value) for key, value in self.latency_ms.items()},
            "errors": self.errors,
            "dropped": self.dropped,
            "sent": self.sent,
            "received": self.received,
        }


def summarize(reports: Sequence[StreamReport], duration_s: float) -> RunSummary:
    """Aggregate stream reports: total FPS is the sum of the streams' FPS, latency percentiles pool all outputs."""
    per_stream_fps = [report.fps(duration_s) for report in reports]
    pooled = [latency for report in reports for latency in report.latencies_s]
    return RunSummary(
        streams=len(reports),
        duration_s=duration_s,
        sent=sum(report.sent for report in reports),
        received=sum(report.received for report in reports),
        dropped=sum(report.dropped for report in reports),
        errors=sum(report.errors for report in reports),
        total_fps=math.fsum(per_stream_fps),
        per_stream_fps=per_stream_fps,
        latency_ms=latency_summary_ms(pooled),
    )


def meets_target(summary: RunSummary, target_fps: float) -> bool:
    """Whether the mean per-stream FPS of a run reaches `target_fps` (a run with no streams never does)."""
    if summary.streams == 0:
        return False
    return summary.total_fps / summary.streams >= target_fps


@dataclass(frozen=True)
class RampResult:
    """Outcome of a ramp: `capacity` is the largest stream count whose mean per-stream FPS met the target,
    `below_target_at` the first count that fell below it (`None` if the ramp hit its bound first)."""

    target_fps: float
    capacity: int
    below_target_at: int | None
    steps: list[RunSummary]


def ramp_result(steps: Sequence[RunSummary], target_fps: float) -> RampResult:
    """Read a ramp's runs (in increasing stream count) up to the first one below the target."""
    capacity = 0
    for summary in steps:
        if not meets_target(summary, target_fps):
            return RampResult(target_fps, capacity, summary.streams, list(steps))
        capacity = summary.streams
    return RampResult(target_fps, capacity, None, list(steps))
