"""Timing a stream on a clip: the one measuring loop of the benchmarks.

A "step" is anything called once per frame (`StreamEngine.__call__`, a runner's UNet call, a whole
diffusers pipeline); each call is timed alone, so callers choose the statistic (median or total).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["median_fps", "time_stream", "time_streams"]


def time_streams(steps: Mapping[str, Callable[[Any], Any]], clip: Sequence[Any], frames: int, warmup: int = 0,
                 on_outputs: Callable[[int, dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds of every step on each of `frames` frames, after `warmup` frames that are not timed.

    Call `i` (warm-up calls counted) gets `clip[i % len(clip)]`. On each frame every step runs in turn,
    in the order of `steps`, so a load change on a shared machine hits all of them alike.

    Args:
        steps (`Mapping[str, Callable]`): name -> the per-frame call of one stream.
        clip (`Sequence`): the frames, cycled through from the start.
        frames (`int`): timed frames per step.
        warmup (`int`, defaults to 0): untimed frames before them.
        on_outputs (`Callable[[int, dict], None]`, *optional*): called after every frame, warm-up included,
            with the call index and each step's output.
        clock (`Callable[[], float]`, defaults to `time.perf_counter`): seconds of a monotonic clock.

    Returns:
        `dict[str, list[float]]`: name -> the `frames` timed calls' seconds, in order.
    """
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + frames):
        frame = clip[index % len(clip)]
        outputs = {}
        for name, step in steps.items():
            started = clock()
            outputs[name] = step(frame)
            if index >= warmup:
                seconds[name].append(clock() - started)
        if on_outputs is not None:
            on_outputs(index, outputs)
    return seconds


def time_stream(step: Callable[[Any], Any], clip: Sequence[Any], frames: int, warmup: int = 0,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of `step` on each of `frames` frames of `clip` after `warmup` untimed ones (`time_streams`
    with one step)."""
    return time_streams({"stream": step}, clip, frames, warmup, clock=clock)["stream"]


def median_fps(seconds: Sequence[float]) -> float:
    """Frames per second of the median frame time."""
    return 1.0 / statistics.median(seconds)
