"""The one protocol-facing piece of both clients: a WebSocket session with the server.

`StreamConnection.open` connects and reads `hello`; `send_frame` waits for a free in-flight slot (so at most
`max_in_flight` frames are ever unanswered and latency cannot pile up) and records the send time of the
frame's sequence number; every answer names its frame (`wire`: `frame` + JPEG, `dropped`, `error` with `seq`),
so `next_output` returns each output with its own frame's send time, and a dropped or failed frame frees its
slot the moment its answer arrives. `connect_with_backoff` retries while the server is down, restarting or full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from wire import (
    CLOSE_TRY_AGAIN_LATER,
    DroppedEvent,
    ErrorEvent,
    FrameEvent,
    Hello,
    StatsEvent,
    WireError,
    close_is_fatal,
    parse_event,
    prompt_message,
)

from .protocol import backoff_delays, with_token

logger = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


class ConnectionFailed(RuntimeError):
    """The session could not be opened or was lost. `retryable` says whether reconnecting may help."""

    def __init__(self, message: str, retryable: bool, close_code: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.close_code = close_code


@dataclass(frozen=True)
class Output:
    """One output frame, the frame it answers and its timing.

    `sent_at`/`received_at` are this client's clock (send → receive, network included); `server_latency_ms`
    is the server's own (frame received → answer sent); `skipped`: the server repeated its previous output.
    """

    seq: int
    jpeg: bytes
    sent_at: float
    received_at: float
    server_latency_ms: float
    skipped: bool

    @property
    def latency_s(self) -> float:
        return self.received_at - self.sent_at


def closed_failure(code: int | None, reason: str = "") -> ConnectionFailed:
    """The failure for a session the server (or the network) closed with `code`."""
    if code == CLOSE_TRY_AGAIN_LATER:
        message = f"server is busy (close {code}: {reason or 'try again later'})"
    else:
        message = f"connection closed (code {code}{': ' + reason if reason else ''})"
    return ConnectionFailed(message, retryable=not close_is_fatal(code), close_code=code)


def _from_closed(error: ConnectionClosed) -> ConnectionFailed:
    frame = error.rcvd or error.sent
    return closed_failure(frame.code if frame else None, frame.reason if frame else "")


class StreamConnection:
    """An open session. Create with `await StreamConnection.open(url)`; use as an async context manager.

    Args:
        websocket: the open WebSocket, after `hello` was read.
        hello: the server's `hello`.
        clock: the time source for send/receive stamps (seconds, monotonic).
    """

    def __init__(self, websocket: ClientConnection, hello: Hello, clock: Callable[[], float] = time.perf_counter):
        self.websocket = websocket
        self.hello = hello
        self.clock = clock
        self.dropped = 0
        self.errors: list[ErrorEvent] = []
        self.last_stats: StatsEvent | None = None
        #: Send time of each frame not answered yet, by sequence number.
        self._pending: dict[int, float] = {}
        self._next_seq = 0
        self._announced: FrameEvent | None = None
        self._received_untaken = 0
        self._outputs: asyncio.Queue[Output | None] = asyncio.Queue()  # None marks the end
        self._slot_freed = asyncio.Event()
        self._failure: ConnectionFailed | None = None
        self._reader = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, url: str, token: str | None = None, open_timeout: float = 10.0,
                   max_message: int = DEFAULT_MAX_MESSAGE) -> StreamConnection:
        """Connect to `url` and read the server's `hello`.

        Raises:
            ConnectionFailed: refused, rejected, full, or no valid `hello` within `open_timeout`.
        """
        try:
            # proxy=None: talk to exactly the URL given, never through an environment proxy.
            websocket = await connect(with_token(url, token), open_timeout=open_timeout, compression=None,
                                      max_size=max_message, proxy=None)
        except InvalidStatus as error:
            status = error.response.status_code
            raise ConnectionFailed(f"server rejected the connection with HTTP {status}",
                                   retryable=status >= 500) from error
        except InvalidURI as error:
            raise ConnectionFailed(f"invalid URL {url!r}: {error}", retryable=False) from error
        except (OSError, InvalidHandshake, TimeoutError) as error:
            raise ConnectionFailed(f"cannot connect to {url}: {error or type(error).__name__}",
                                   retryable=True) from error
        try:
            first = await asyncio.wait_for(websocket.recv(), open_timeout)
            if isinstance(first, bytes):
                raise WireError("the server's first message must be a text hello, got binary")
            hello = parse_event(first)
            if not isinstance(hello, Hello):
                raise WireError(f"the server's first message must be hello, got {first[:200]!r}")
        except ConnectionClosed as error:
            raise _from_closed(error) from error
        except (WireError, TimeoutError) as error:
            await websocket.close()
            raise ConnectionFailed(f"no valid hello from {url}: {error or 'timed out'}", retryable=True) from error
        return cls(websocket, hello)

    @property
    def max_in_flight(self) -> int:
        return self.hello.max_in_flight

    @property
    def in_flight(self) -> int:
        """Frames sent and not yet answered."""
        return len(self._pending)

    @property
    def outstanding(self) -> int:
        """Frames sent whose outputs have not been taken with `next_output` yet (in flight or received)."""
        return len(self._pending) + self._received_untaken

    @property
    def failure(self) -> ConnectionFailed | None:
        """Why the session ended, once it has."""
        return self._failure

    async def wait_slot(self, timeout: float | None = None) -> bool:
        """Wait until a frame may be sent without exceeding `max_in_flight`; `False` on timeout.

        Raises:
            ConnectionFailed: the session ended.
        """
        async def slot_free() -> None:
            while self.in_flight >= self.max_in_flight:
                self._raise_if_failed()
                self._slot_freed.clear()
                await self._slot_freed.wait()

        try:
            await asyncio.wait_for(slot_free(), timeout)
        except TimeoutError:
            return False
        self._raise_if_failed()
        return True

    async def send_frame(self, data: bytes, timeout: float | None = None) -> float | None:
        """Send one encoded frame once a slot is free; returns its send time, or `None` if no slot came in time."""
        if not await self.wait_slot(timeout):
            return None
        sent_at = self.clock()
        self._pending[self._next_seq] = sent_at
        self._next_seq += 1
        try:
            await self.websocket.send(data)
        except ConnectionClosed as error:
            self._fail(_from_closed(error))
            self._raise_if_failed()
        return sent_at

    async def next_output(self, timeout: float | None = None) -> Output:
        """The next output frame, in order.

        Raises:
            TimeoutError: none within `timeout`.
            ConnectionFailed: the session ended and every output received before that was taken.
        """
        output = await asyncio.wait_for(self._outputs.get(), timeout)
        if output is None:
            self._outputs.put_nowait(None)  # keep the end marker for later callers
            self._raise_if_failed()
        self._received_untaken -= 1
        return output

    async def send_prompt(self, prompt: str, negative_prompt: str | None = None) -> None:
        await self._send_text(prompt_message(prompt, negative_prompt))

    async def close(self) -> None:
        """Close the session and stop reading."""
        await self.websocket.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> StreamConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _send_text(self, text: str) -> None:
        self._raise_if_failed()
        try:
            await self.websocket.send(text)
        except ConnectionClosed as error:
            self._fail(_from_closed(error))
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, failure: ConnectionFailed) -> None:
        if self._failure is None:
            self._failure = failure
            self._outputs.put_nowait(None)
        self._slot_freed.set()

    async def _read_loop(self) -> None:
        try:
            async for message in self.websocket:
                if isinstance(message, bytes):
                    self._on_output(message)
                else:
                    self._on_event(message)
            self._fail(closed_failure(self.websocket.close_code, self.websocket.close_reason or ""))
        except ConnectionClosed as error:
            self._fail(_from_closed(error))
        except WireError as error:
            self._fail(ConnectionFailed(str(error), retryable=True))
            await self.websocket.close()
        finally:
            self._fail(ConnectionFailed("the session was closed by this client", retryable=False))

    def _answered(self, seq: int) -> float:
        """Forget frame `seq` (its answer came) and free its slot; its send time."""
        sent_at = self._pending.pop(seq, None)
        if sent_at is None:
            raise WireError(f"the server answered frame {seq}, which is not in flight")
        self._slot_freed.set()
        return sent_at

    def _on_output(self, jpeg: bytes) -> None:
        received_at = self.clock()
        announced, self._announced = self._announced, None
        if announced is None:
            raise WireError("the server sent an output frame without a `frame` event before it")
        sent_at = self._answered(announced.seq)
        self._outputs.put_nowait(Output(announced.seq, jpeg, sent_at, received_at, announced.latency_ms,
                                        announced.skipped))
        self._received_untaken += 1

    def _on_event(self, text: str) -> None:
        event = parse_event(text)
        if self._announced is not None:
            raise WireError(f"expected frame {self._announced.seq}'s JPEG after its `frame` event, got {text[:200]!r}")
        if isinstance(event, FrameEvent):
            self._announced = event
        elif isinstance(event, DroppedEvent):
            self._answered(event.seq)
            self.dropped += 1
        elif isinstance(event, ErrorEvent):
            self.errors.append(event)
            logger.warning("server error %s: %s", event.code, event.message)
            if event.seq is not None:
                self._answered(event.seq)
        elif isinstance(event, StatsEvent):
            self.last_stats = event
        elif isinstance(event, Hello):
            raise WireError("the server sent a second hello")


async def connect_with_backoff(url: str, token: str | None = None, delays: Iterator[float] | None = None,
                               max_attempts: int = 10, open_timeout: float = 10.0,
                               on_retry: Callable[[ConnectionFailed, float], None] | None = None) -> StreamConnection:
    """Open a session, retrying retryable failures after each delay of `delays` (exponential by default).

    Raises:
        ConnectionFailed: a failure that retrying cannot fix, or the last one after `max_attempts` attempts.
    """
    delays = delays if delays is not None else backoff_delays()
    for attempt in range(1, max_attempts + 1):
        try:
            return await StreamConnection.open(url, token, open_timeout=open_timeout)
        except ConnectionFailed as failure:
            if not failure.retryable or attempt == max_attempts:
                raise
            delay = next(delays)
            if on_retry is not None:
                on_retry(failure, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")
