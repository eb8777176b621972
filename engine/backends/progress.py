"""A heartbeat for work that takes minutes (ONNX export, TensorRT engine build) and reports nothing itself."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

DEFAULT_INTERVAL_S = 30.0


@contextlib.contextmanager
def heartbeat(log: logging.Logger, what: str, interval_s: float = DEFAULT_INTERVAL_S) -> Iterator[None]:
    """Log `<what>: still running after N s` every `interval_s` seconds until the block ends.

    The exporters and the TensorRT builder are silent for minutes on a full-size UNet; a log line
    every half minute tells an operator the process is working, not hung.
    """
    started = time.perf_counter()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval_s):
            log.info("%s: still running after %.0f s", what, time.perf_counter() - started)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
