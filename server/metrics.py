"""Prometheus metrics of one app, in a registry of its own (two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    """Counters, gauges and histograms the server updates as frames move.

    `frames_in` counts binary messages received, `frames_out` JPEGs sent, `dropped` frames replaced by
    newer ones (latest wins), `skipped` outputs the similarity filter answered with the previous output.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.frames_in = Counter("streamdiff_frames_in", "Frames received from clients.", registry=self.registry)
        self.frames_out = Counter("streamdiff_frames_out", "Output JPEG frames sent to clients.",
                                  registry=self.registry)
        self.dropped = Counter("streamdiff_frames_dropped", "Frames dropped because a newer frame replaced them.",
                               registry=self.registry)
        self.skipped = Counter("streamdiff_frames_skipped", "Outputs the similarity filter skipped.",
                               registry=self.registry)
        self.frame_errors = Counter("streamdiff_frame_errors", "Frames answered with an error event.", ["code"],
                                    registry=self.registry)
        self.message_errors = Counter("streamdiff_message_errors", "Bad control messages.", ["code"],
                                      registry=self.registry)
        self.sessions = Gauge("streamdiff_sessions", "Open WebSocket sessions.", registry=self.registry)
        self.rejected = Counter("streamdiff_sessions_rejected", "WebSocket sessions refused.", ["reason"],
                                registry=self.registry)
        self.latency = Histogram("streamdiff_latency_seconds", "End-to-end latency: frame received → answer sent.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("streamdiff_inference_seconds", "Model time per frame.",
                                   buckets=INFERENCE_BUCKETS, registry=self.registry)

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
