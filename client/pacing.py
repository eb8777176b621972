"""Pure frame pacing for an FPS cap."""

from __future__ import annotations


def next_due(previous_due: float, period: float, now: float) -> float:
    """When the next frame is due under a cap of one frame per `period` seconds.

    Keeps a steady cadence, but after falling more than a period behind (a slow server or source) it restarts
    from `now` instead of sending a burst to catch up.
    """
    if period <= 0:
        return now
    due = previous_due + period
    return due if due >= now - period else now
