"""Sessions: one WebSocket client's stream (an engine `StreamHandle`) and their registry.

The registry lives on the event loop; everything slow it triggers (opening a stream encodes the
prompt, parameter updates may re-encode it) runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.runtime import StreamHandle, StreamRuntime
from wire import BUSY, INVALID_PARAMS, StatsEvent

from .protocol import UPDATABLE_PARAMS

#: Parameters `describe` lists under `params` (the prompts have their own keys).
_LISTED_PARAMS = sorted(UPDATABLE_PARAMS - {"prompt", "negative_prompt"})


class SessionLimitError(RuntimeError):
    """Every session slot is taken."""


class UpdateRefused(ValueError):
    """A parameter update the server's policy refuses; `code` is the wire's error code (`busy`, `invalid_params`)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class UpdatePolicy:
    """What a session's parameter updates may cost, beyond what the engine validates.

    A change of `t_index_list` re-prepares the stream: the next frame primes its buffer with n - 1 full UNet
    calls on the inference thread every session shares, and a compiled backend opens a graph per step count.
    So the steps are capped and re-prepares rate-limited per session.

    Args:
        max_steps (`int`, defaults to 4): most denoising steps (`t_index_list` entries) of a session.
        reprepare_interval_s (`float`, defaults to 1.0): seconds between two re-prepares of one session; one
            sooner is refused with `busy`.
    """

    max_steps: int = 4
    reprepare_interval_s: float = 1.0

    def check(self, current: tuple[int, ...], params: dict[str, object], last_reprepare: float | None,
              now: float) -> bool:
        """Whether `params` re-prepare a stream now at `current` steps; raises `UpdateRefused` if not allowed."""
        steps = params.get("t_index_list")
        if steps is None or tuple(steps) == tuple(current):
            return False
        if len(steps) > self.max_steps:
            raise UpdateRefused(INVALID_PARAMS, f"`t_index_list` has {len(steps)} steps; this server allows at "
                                                f"most {self.max_steps} (--max-steps)")
        if last_reprepare is not None and now - last_reprepare < self.reprepare_interval_s:
            raise UpdateRefused(BUSY, f"`t_index_list` changed {now - last_reprepare:.2f} s ago; a session may "
                                      f"change it once every {self.reprepare_interval_s:g} s")
        return True


@dataclass
class OutputWindow:
    """Recent outputs of one session: delivered FPS and mean latency over the last `size` frames."""

    size: int = 30
    sent_at: deque = field(default_factory=deque)
    latencies: deque = field(default_factory=deque)
    inference: deque = field(default_factory=deque)

    def record(self, sent_at: float, latency_s: float, inference_s: float) -> None:
        for values, value in ((self.sent_at, sent_at), (self.latencies, latency_s), (self.inference, inference_s)):
            values.append(value)
            if len(values) > self.size:
                values.popleft()

    @property
    def fps(self) -> float:
        """Outputs per second between the oldest and newest recorded output (0 with fewer than two)."""
        if len(self.sent_at) < 2 or self.sent_at[-1] <= self.sent_at[0]:
            return 0.0
        return (len(self.sent_at) - 1) / (self.sent_at[-1] - self.sent_at[0])

    @property
    def latency_s(self) -> float | None:
        return sum(self.latencies) / len(self.latencies) if self.latencies else None

    @property
    def inference_s(self) -> float | None:
        return sum(self.inference) / len(self.inference) if self.inference else None


class Session:
    """One client's stream: its runtime handle, recent output statistics and the latest output frame.

    The latest JPEG is kept (one frame, replaced on each output) for the MJPEG and viewer routes.
    """

    def __init__(self, handle: StreamHandle, session_id: str | None = None, policy: UpdatePolicy = UpdatePolicy()):
        self.id = handle.id if session_id is None else session_id
        self.handle = handle
        self.policy = policy
        self.last_reprepare: float | None = None
        self.created = time.time()
        self.window = OutputWindow()
        self.closed = False
        self.latest_jpeg: bytes | None = None
        self.frame_number = 0
        self.pending_updates = 0
        self.viewers = 0
        self._new_frame = asyncio.Event()
        self._update_lock = asyncio.Lock()
        #: Set when the server drains (SIGTERM): the session answers its frames in flight, then closes (1001).
        self.draining = asyncio.Event()

    async def update(self, params: dict[str, object]) -> None:
        """Apply engine parameters off the event loop, one update at a time in arrival order.

        Raises:
            UpdateRefused: the update is over the server's `UpdatePolicy`.
            ValueError: from the engine, for an invalid value (the stream keeps its old parameters).
        """
        self.pending_updates += 1
        try:
            async with self._update_lock:
                now = time.monotonic()
                reprepares = self.policy.check(self.handle.config.t_index_list, params, self.last_reprepare, now)
                await asyncio.to_thread(self.handle.update, **params)
                if reprepares:
                    self.last_reprepare = now
        except ValueError:
            raise
        except Exception as error:  # e.g. the tokenizer choking on a prompt: the stream keeps its parameters
            raise ValueError(f"the update failed ({type(error).__name__}: {error}); the session keeps its "
                             "previous parameters") from error
        finally:
            self.pending_updates -= 1

    def publish(self, jpeg: bytes) -> None:
        """Make `jpeg` the latest output and wake the viewers."""
        self.latest_jpeg = jpeg
        self.frame_number += 1
        self._wake_viewers()

    def end(self) -> None:
        """Mark the session closed and let every viewer finish."""
        self.closed = True
        self._wake_viewers()

    def _wake_viewers(self) -> None:
        event, self._new_frame = self._new_frame, asyncio.Event()
        event.set()

    async def next_frame(self, after: int, timeout: float) -> tuple[int, bytes] | None:
        """The latest output once it is newer than frame number `after`; `None` on close or time-out."""
        deadline = time.monotonic() + timeout
        while not self.closed and (self.frame_number <= after or self.latest_jpeg is None):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._new_frame.wait(), remaining)
            except TimeoutError:
                return None
        if self.closed:
            return None
        return self.frame_number, self.latest_jpeg

    def stats(self) -> StatsEvent:
        """The session's recent rates and its counters: the WebSocket's `stats` event, and the counters of the REST
        view (`describe`), built once here for both."""
        stats, window = self.handle.stats, self.window
        latency, inference = window.latency_s, window.inference_s
        return StatsEvent(
            fps=round(window.fps, 3),
            latency_ms=None if latency is None else round(latency * 1000, 3),
            inference_ms=None if inference is None else round(inference * 1000, 3),
            frames_in=stats.frames_in, frames_out=stats.frames_out, dropped=stats.dropped,
            skipped=stats.skipped, errors=stats.errors, in_flight=self.handle.in_flight,
        )

    def describe(self) -> dict[str, object]:
        """The REST view of the session: its prompt, size and live parameters, and `stats`."""
        config = self.handle.config
        params = config.flat_params()
        return {
            "id": self.id,
            "created": self.created,
            "prompt": config.prompt,
            "negative_prompt": config.negative_prompt,
            "width": config.width,
            "height": config.height,
            "params": {name: params[name] for name in _LISTED_PARAMS},
            **dataclasses.asdict(self.stats()),
        }


def _close_opened(opening: asyncio.Future) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class SessionRegistry:
    """The open sessions, at most `max_sessions` (counting ones still being opened).

    With a `replica_id`, session ids are `<replica_id>-<stream id>` so a proxy can route on them.
    """

    def __init__(self, max_sessions: int, replica_id: str = "", policy: UpdatePolicy = UpdatePolicy()):
        self.max_sessions = max_sessions
        self.replica_id = replica_id
        self.policy = policy
        self._sessions: dict[str, Session] = {}
        self._opening = 0
        self.draining = False

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    @property
    def has_room(self) -> bool:
        """Whether `open` would accept one more session now (sessions still being opened hold their slot)."""
        return len(self._sessions) + self._opening < self.max_sessions

    async def open(self, runtime: StreamRuntime, max_in_flight: int, notify: Callable[[], None]) -> Session:
        """Open a stream in `runtime` for a new session.

        Raises:
            SessionLimitError: when `max_sessions` sessions are open or opening.
        """
        if self.draining:
            raise SessionLimitError("the server is shutting down; connect again (to another replica)")
        if not self.has_room:
            raise SessionLimitError(f"server full: {self.max_sessions} of {self.max_sessions} sessions in use, "
                                    "try again later")
        self._opening += 1  # the slot is held while the prompt encodes in a worker thread
        opening = asyncio.ensure_future(asyncio.to_thread(runtime.open_stream, max_in_flight, notify))
        try:
            handle = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The client left while its stream was being opened: close the stream once it exists.
            opening.add_done_callback(_close_opened)
            raise
        finally:
            self._opening -= 1
        session = Session(handle, f"{self.replica_id}-{handle.id}" if self.replica_id else handle.id, self.policy)
        self._sessions[session.id] = session
        if self.draining:  # the drain began while this one was opening
            session.draining.set()
        return session

    def drain(self) -> None:
        """Open no more sessions, and ask every open one to answer its frames in flight and close."""
        self.draining = True
        for session in self._sessions.values():
            session.draining.set()

    def close(self, session: Session) -> None:
        """Remove a session and its stream; its viewers see the end of the stream."""
        session.handle.close()
        session.end()
        self._sessions.pop(session.id, None)
