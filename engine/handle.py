"""`StreamHandle`: one stream inside the runtime — its frames in, its answers out, its parameters.

Every frame put on a stream gets exactly one answer, named by the frame's sequence number (0, 1, 2, ...
in the order frames were put): a `FrameResult` (a JPEG, or an error for a frame that could not be used),
in sequence order, or a `Dropped` when a newer frame replaced it (latest wins), as soon as it is replaced.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .codec import FrameError
from .flow_control import RecentUsage, admit_frame
from .stream import StreamEngine
from .stream_state import FrameWork


@dataclass
class FrameResult:
    """The answer to one frame: a JPEG, or an error for a frame that could not be used.

    Args:
        seq (`int`): the frame's sequence number on its stream.
        arrival (`float`): when the frame was put (`time.monotonic()`).
        jpeg (`bytes | None`): the output, when there is one.
        error (`FrameError | None`): why there is none.
        skipped (`bool`): the similarity filter skipped the frame; `jpeg` repeats the previous output.
        inference_s (`float`): model time spent on the frame (VAE encode, UNet, VAE decode).
        done (`float`): when the answer was ready (`time.monotonic()`).
    """

    seq: int
    arrival: float
    jpeg: bytes | None = None
    error: FrameError | None = None
    skipped: bool = False
    inference_s: float = 0.0
    done: float = 0.0


@dataclass
class Dropped:
    """Frames `first`..`last` (sequence numbers, inclusive) were replaced by newer frames and get no output.

    Consecutive drops share one `Dropped`, so a client that floods a stalled stream costs O(1) memory.
    """

    first: int
    last: int

    @property
    def seqs(self) -> range:
        return range(self.first, self.last + 1)


Answer = FrameResult | Dropped


@dataclass(frozen=True)
class StreamStats:
    """Counters of one stream since it opened."""

    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    skipped: int = 0
    errors: int = 0
    errors_by_code: dict[str, int] = field(default_factory=dict)


@dataclass
class Job:
    """A frame between `put` and its answer; the runtime's threads fill it in."""

    seq: int
    data: bytes
    arrival: float
    frame: FrameWork | None = None
    error: FrameError | None = None
    #: Model time spent on the frame so far (VAE encode, UNet, VAE decode), in seconds.
    model_s: float = 0.0
    #: An input thread took it: the stream's state has seen it (e.g. its similarity filter), so a newer
    #: frame may no longer replace it.
    started: bool = False

    @property
    def decoded(self) -> bool:
        return self.frame is not None or self.error is not None


class StreamHandle:
    """A stream inside a `StreamRuntime`: put frames, get answers, update parameters, close.

    Created by `StreamRuntime.open_stream`. `schedule` is the runtime's condition: the handle's waiting
    frames are read and changed under it, and putting a frame wakes the runtime's threads through it.

    Args:
        engine (`StreamEngine`): the stream's own state.
        max_in_flight (`int`): frames accepted and not yet answered (and taken) at most; past that, a new
            frame replaces the oldest waiting one.
        schedule (`threading.Condition`): the runtime's scheduling condition.
        notify (`Callable[[], None] | None`): called (from a runtime thread) when an answer is ready.
        on_close (`Callable[[StreamHandle], None] | None`): called once when the stream closes.
    """

    def __init__(self, engine: StreamEngine, max_in_flight: int, schedule: threading.Condition,
                 notify: Callable[[], None] | None = None,
                 on_close: Callable[[StreamHandle], None] | None = None):
        if max_in_flight < 1:
            raise ValueError(f"`max_in_flight` must be >= 1, got {max_in_flight}")
        self.id = uuid.uuid4().hex[:12]
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.closed = False
        #: Recent input-stage time (decode + VAE encode) of this stream, for time-fair input scheduling.
        self.input_usage = RecentUsage()
        #: Recent UNet-stage time of this stream (its share of batches, its own priming), for time-fair batches.
        self.inference_usage = RecentUsage()
        #: An input thread is working on one of this stream's frames (one at a time keeps their order).
        self.in_input_stage = False
        self._schedule = schedule
        self._notify = notify
        self._on_close = on_close
        self._waiting: deque[Job] = deque()
        self._answers: deque[Answer] = deque()
        self._ready = threading.Condition()
        self._next_seq = 0
        #: Arrival time of every accepted frame whose answer is not made yet, by seq.
        self._pending: dict[int, float] = {}
        self._unanswered = 0
        self._frames_out = 0
        self._dropped = 0
        self._errors: Counter[str] = Counter()

    # ------------------------------------------------------------------ the stream's user

    @property
    def config(self):
        """The stream's current `StreamConfig`."""
        return self.engine.config

    @property
    def in_flight(self) -> int:
        """Frames accepted whose answer has not been taken yet (dropped frames are answered at once)."""
        return self._unanswered

    @property
    def stats(self) -> StreamStats:
        """The stream's counters (skips are the engine's own count)."""
        with self._ready:
            errors = dict(self._errors)
            return StreamStats(frames_in=self._next_seq, frames_out=self._frames_out, dropped=self._dropped,
                               skipped=self.engine.frames_skipped, errors=sum(errors.values()),
                               errors_by_code=errors)

    def put(self, data: bytes, arrival: float | None = None) -> int:
        """Queue an encoded frame; returns its sequence number. Its answer comes from `get`.

        Latest wins: at `max_in_flight`, the frame replaces the oldest one still waiting for an input thread,
        which is answered with `Dropped` at once; with none waiting, the new frame itself is dropped.
        """
        arrival = time.monotonic() if arrival is None else arrival
        with self._schedule:
            with self._ready:
                seq = self._next_seq
                self._next_seq += 1
            if self.closed:
                return seq
            replaceable = [index for index, job in enumerate(self._waiting) if not job.started]
            decision = admit_frame(self._unanswered, len(replaceable), self.max_in_flight)
            if not decision.accept:
                self._drop(seq)
                return seq
            if decision.replace_index is not None:
                index = replaceable[decision.replace_index]
                replaced = self._waiting[index]
                del self._waiting[index]
                self._drop(replaced.seq)
            else:
                with self._ready:
                    self._unanswered += 1
            with self._ready:
                self._pending[seq] = arrival
            self._waiting.append(Job(seq, data, arrival))
            self._schedule.notify_all()
        return seq

    def refuse(self) -> int:
        """Answer a frame that will not be queued (a client over its message rate) with `Dropped` at once.

        Returns its sequence number, so the stream's numbering stays that of every frame sent.
        """
        with self._ready:
            seq = self._next_seq
            self._next_seq += 1
        self._drop(seq)
        return seq

    def behind_s(self, now: float) -> float:
        """Seconds the oldest frame still waiting for its answer has waited (0 when none waits): how far the
        stream is behind its input."""
        with self._ready:
            oldest = min(self._pending.values(), default=None)
        return 0.0 if oldest is None else max(0.0, now - oldest)

    def get(self, timeout: float | None = None) -> Answer | None:
        """The next answer, waiting up to `timeout` seconds; `None` on time-out or once closed."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._answers or self.closed, timeout):
                return None
            return self._take()

    def get_nowait(self) -> Answer | None:
        """The next answer if one is ready."""
        with self._ready:
            return self._take()

    def update(self, **params) -> None:
        """Change parameters between two frames, all or none (`StreamEngine.update_params`; encodes a new
        prompt on the caller's thread, so call it off an event loop).

        Raises:
            ValueError: an unknown, fixed or load-time parameter, or an invalid value; the stream keeps its
                previous parameters.
        """
        self.engine.update_params(**params)

    def close(self) -> None:
        """Stop the stream: its waiting frames are discarded and `get` stops waiting."""
        with self._schedule:
            self._waiting.clear()
        with self._ready:
            if self.closed:
                return
            self.closed = True
            self._answers.clear()
            self._ready.notify_all()
        if self._on_close is not None:
            self._on_close(self)

    # ------------------------------------------------------------------ the runtime's threads
    # Called with the runtime's `schedule` condition held, except `deliver`.

    def next_undecoded(self) -> Job | None:
        """The oldest waiting frame no input thread has taken, unless one of this stream's is in the input stage."""
        if self.in_input_stage:
            return None
        return next((job for job in self._waiting if not job.started), None)

    def head_decoded(self) -> bool:
        """Whether the oldest waiting frame is through the input stage (and may go to inference)."""
        return bool(self._waiting) and self._waiting[0].decoded

    def head_in_input_stage(self) -> bool:
        """Whether the oldest waiting frame is still in the input stage."""
        return bool(self._waiting) and not self._waiting[0].decoded

    def pop_head(self) -> Job:
        """Take the oldest waiting frame for inference."""
        return self._waiting.popleft()

    def deliver(self, result: FrameResult) -> None:
        """Make `result` the next answer and tell the stream's user."""
        with self._ready:
            self._pending.pop(result.seq, None)
            if self.closed:
                return
            if result.error is None:
                self._frames_out += 1
            else:
                self._errors[result.error.code] += 1
            self._answers.append(result)
            self._ready.notify_all()
        if self._notify is not None:
            self._notify()

    # ------------------------------------------------------------------ internals

    def _drop(self, seq: int) -> None:
        with self._ready:
            self._pending.pop(seq, None)
            self._dropped += 1
            last = self._answers[-1] if self._answers else None
            if isinstance(last, Dropped) and last.last == seq - 1:
                last.last = seq
            else:
                self._answers.append(Dropped(seq, seq))
            self._ready.notify_all()
        if self._notify is not None:
            self._notify()

    def _take(self) -> Answer | None:
        if not self._answers:
            return None
        answer = self._answers.popleft()
        if isinstance(answer, FrameResult):
            self._unanswered -= 1
        return answer
