"""Prometheus metrics of one app, in a registry of its own (two apps in one process never collide).

Each fact is counted once, where it happens. Frames in, out, dropped, skipped and failed are the engine
runtime's counters, read when `/metrics` is scraped (`RuntimeCollector`); the server counts only what it
alone sees: refused sessions, bad control messages, and the latency of the answers it sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from engine.runtime import RuntimeStatus

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


#: (metric, `RuntimeStatus` field, help) of each runtime counter.
_RUNTIME_COUNTERS = (
    ("streamdiff_frames_in", "frames_in", "Frames received from clients."),
    ("streamdiff_frames_out", "frames_out", "Output frames answered."),
    ("streamdiff_frames_dropped", "dropped", "Frames dropped because a newer frame replaced them."),
    ("streamdiff_frames_skipped", "skipped", "Outputs the similarity filter repeated instead of computing."),
)


class RuntimeCollector(Collector):
    """The engine runtime's counters and the open sessions, as Prometheus metrics at scrape time.

    `frames_in`: frames received; `frames_out`: output frames; `frames_dropped`: frames replaced by newer ones
    (latest wins); `frames_skipped`: outputs the similarity filter repeated; `frame_errors{code}`: frames
    answered with an error.
    """

    def __init__(self, status: Callable[[], RuntimeStatus | None], sessions: Callable[[], int]):
        self.status = status
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        status = self.status()
        for name, field, documentation in _RUNTIME_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=0 if status is None else getattr(status, field))
        errors = CounterMetricFamily("streamdiff_frame_errors", "Frames answered with an error event.",
                                     labels=["code"])
        for code, count in ({} if status is None else status.errors_by_code).items():
            errors.add_metric([code], count)
        yield errors
        yield CounterMetricFamily("streamdiff_inference_errors", "Network calls that failed (their frames answered "
                                  "with inference_failed).", value=0 if status is None else status.inference_errors)
        yield GaugeMetricFamily("streamdiff_batch_limit", "Streams that may share a UNet call now (lowered after a "
                                "shared call ran out of memory).", value=0 if status is None else status.batch_limit)
        yield GaugeMetricFamily("streamdiff_sessions", "Open WebSocket sessions.", value=self.sessions())
        yield GaugeMetricFamily("streamdiff_fps_out", "Output frames per second over the last seconds.",
                                value=0.0 if status is None else status.fps_out)


class ServerMetrics:
    """The app's registry: the runtime's counters (collected) and the server's own metrics.

    Args:
        status: the runtime's status now, `None` while it is loading.
        sessions: the number of open sessions now.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, status: Callable[[], RuntimeStatus | None], sessions: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(RuntimeCollector(status, sessions))
        self.message_errors = Counter("streamdiff_message_errors", "Bad control messages.", ["code"],
                                      registry=self.registry)
        self.rejected = Counter("streamdiff_sessions_rejected", "WebSocket sessions refused.", ["reason"],
                                registry=self.registry)
        self.rate_limited = Counter("streamdiff_rate_limited_messages",
                                    "WebSocket messages refused for their session's message rate.", ["kind"],
                                    registry=self.registry)
        self.latency = Histogram("streamdiff_latency_seconds", "End-to-end latency: frame received → answer sent.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("streamdiff_inference_seconds", "Model time per frame.",
                                   buckets=INFERENCE_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
