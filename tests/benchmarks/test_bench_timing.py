"""`benchmarks.timing`: which calls are timed, in which order, on which frames."""

from __future__ import annotations

import pytest

from benchmarks.timing import median_fps, time_stream, time_streams

pytestmark = pytest.mark.slow


class FakeClock:
    """Seconds that pass only when a step says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_step_is_timed_alone_after_the_warm_up():
    clock, calls, seen = FakeClock(), [], []

    def step(name: str, cost: float):
        def call(frame: int) -> str:
            calls.append((name, frame))
            clock.now += cost * frame
            return f"{name}{frame}"
        return call

    seconds = time_streams({"slow": step("slow", 2.0), "fast": step("fast", 0.5)}, [1, 2, 3], frames=4, warmup=2,
                           on_outputs=lambda index, outputs: seen.append((index, outputs)), clock=clock)
    # Calls cycle through the clip from its start, both steps in turn on each frame.
    assert calls == [(name, frame) for frame in (1, 2, 3, 1, 2, 3) for name in ("slow", "fast")]
    assert seconds == {"slow": [6.0, 2.0, 4.0, 6.0], "fast": [1.5, 0.5, 1.0, 1.5]}
    assert seen[0] == (0, {"slow": "slow1", "fast": "fast1"}) and [index for index, _ in seen] == list(range(6))


def test_one_stream_and_its_median_rate():
    clock = FakeClock()

    def step(frame: float) -> None:
        clock.now += frame

    seconds = time_stream(step, [0.5, 0.25, 0.125], frames=3, warmup=1, clock=clock)
    assert seconds == [0.25, 0.125, 0.5]
    assert median_fps(seconds) == 4.0
