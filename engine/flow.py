"""Pure flow-control decisions: admitting frames under an in-flight limit and fair scheduling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Admission:
    """What to do with a new frame: accept it, and which waiting frame (index) it replaces, if any."""

    accept: bool
    replace_index: int | None = None


def admit_frame(in_flight: int, waiting: int, max_in_flight: int) -> Admission:
    """Latest wins: below the limit accept; at it, replace the oldest waiting frame; with none
    waiting (all being processed or unsent) drop the new frame itself."""
    if in_flight < max_in_flight:
        return Admission(accept=True)
    if waiting > 0:
        return Admission(accept=True, replace_index=0)
    return Admission(accept=False)


def round_robin(items: Sequence[T], after: int, is_ready: Callable[[T], bool]) -> int | None:
    """Index of the first ready item after position `after`, wrapping around; `None` if none is ready."""
    count = len(items)
    for offset in range(1, count + 1):
        index = (after + offset) % count
        if is_ready(items[index]):
            return index
    return None
