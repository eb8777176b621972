"""Pure flow-control decisions: admitting frames under an in-flight limit and fair scheduling."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Admission:
    """What to do with a new frame: accept it, and which waiting frame (index) it replaces, if any."""

    accept: bool
    replace_index: int | None = None


def admit_frame(in_flight: int, waiting: int, max_in_flight: int) -> Admission:
    """Latest wins: below the limit accept; at it, replace the oldest of the `waiting` frames that may still
    be replaced; with none (all being processed or unsent) drop the new frame itself."""
    if in_flight < max_in_flight:
        return Admission(accept=True)
    if waiting > 0:
        return Admission(accept=True, replace_index=0)
    return Admission(accept=False)


@dataclass
class RecentUsage:
    """Seconds of a shared resource one user took recently: each second counts half after `half_life_s`.

    Pure arithmetic on the times it is given, so scheduling decisions built on it are testable without clocks.
    """

    half_life_s: float = 1.0
    seconds: float = 0.0
    stamp: float = 0.0

    def at(self, now: float) -> float:
        """The decayed usage at time `now`."""
        return self.seconds * 0.5 ** (max(0.0, now - self.stamp) / self.half_life_s)

    def add(self, seconds: float, now: float) -> None:
        """Record `seconds` of use ending at `now`."""
        self.seconds = self.at(now) + seconds
        self.stamp = now


def least_used(items: Sequence[T], after: int, is_ready: Callable[[T], bool],
               usage: Callable[[T], float], tolerance: float = 0.0) -> int | None:
    """Index of the ready item with the least `usage`; ties go round-robin after `after`. `None` if none is ready.

    Serving the least-used first shares a resource by time, not by turns: a user whose work is expensive
    (a huge image to decode) waits while cheaper users catch up, instead of costing each of them its whole
    duration every turn. Usages within `tolerance` of the least count as ties, so users of equal cost keep
    strict turns whatever the noise of their timings.
    """
    count = len(items)
    ready = [(index, usage(items[index])) for index in ((after + offset) % count for offset in range(1, count + 1))
             if is_ready(items[index])]
    if not ready:
        return None
    least = min(used for _, used in ready)
    return next(index for index, used in ready if used <= least + tolerance)


def round_robin(items: Sequence[T], after: int, is_ready: Callable[[T], bool]) -> int | None:
    """Index of the first ready item after position `after`, wrapping around; `None` if none is ready."""
    count = len(items)
    for offset in range(1, count + 1):
        index = (after + offset) % count
        if is_ready(items[index]):
            return index
    return None


@dataclass(frozen=True)
class BatchPick:
    """Items chosen for one batch, and the position the next pick starts after."""

    indices: list[int]
    after: int


def round_robin_batch(items: Sequence[T], after: int, is_ready: Callable[[T], bool],
                      key: Callable[[T], Hashable | None], max_batch: int,
                      usage: Callable[[T], float] | None = None, tolerance: float = 0.0) -> BatchPick | None:
    """Up to `max_batch` ready items in round-robin order after `after`, all sharing the first one's key.

    An item whose key is `None` is never batched with another. The next pick starts after the last item
    taken, or just before the first ready item passed over for a different key, so that one leads the
    next batch and no item starves. With `usage`, the leader is the ready item that used the least
    (`least_used`: ties, within `tolerance`, in round-robin order), so the resource is shared by time: an
    item whose calls cost more waits while the others catch up. `None` if nothing is ready.
    """
    count = len(items)
    if usage is not None:
        leader = least_used(items, after, is_ready, usage, tolerance)
        if leader is None:
            return None
        after = (leader - 1) % count
    indices: list[int] = []
    passed_over: int | None = None
    leader_key: Hashable | None = None
    for offset in range(1, count + 1):
        index = (after + offset) % count
        if not is_ready(items[index]):
            continue
        if not indices:
            indices.append(index)
            leader_key = key(items[index])
        elif leader_key is not None and key(items[index]) == leader_key:
            indices.append(index)
        elif passed_over is None:
            passed_over = index
        if len(indices) == max_batch or leader_key is None:
            break
    if not indices:
        return None
    next_after = indices[-1] if passed_over is None else (passed_over - 1) % count
    return BatchPick(indices, next_after)


@dataclass
class BatchLimit:
    """How many streams may share a UNet call now: `max_batch`, halved each time a shared call runs out of memory,
    and raised again by one after `recover_after` shared calls in a row at the limit went through.

    A frame size or batch size that exhausts the GPU then costs the frames of one call, not every frame after it.
    """

    max_batch: int
    recover_after: int = 200
    limit: int = 0
    _successes: int = 0

    def __post_init__(self) -> None:
        self.limit = self.limit or self.max_batch

    def out_of_memory(self, batch: int) -> None:
        """A call of `batch` streams ran out of memory: allow at most half as many from now on."""
        self.limit = max(1, min(self.limit, batch // 2))
        self._successes = 0

    def succeeded(self, batch: int) -> None:
        """A call of `batch` streams went through."""
        if batch < self.limit or self.limit >= self.max_batch:
            return
        self._successes += 1
        if self._successes >= self.recover_after:
            self.limit, self._successes = self.limit + 1, 0


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device (or host) running out of memory: torch's `OutOfMemoryError`, a `MemoryError`,
    or a backend's error that says so (ONNX Runtime and TensorRT raise plain errors)."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or "out of memory" in text
