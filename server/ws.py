"""`WS /ws`: the streaming WebSocket. It only moves bytes and calls the engine's stream handle.

Each connection runs a receive task (frames go to `StreamHandle.put`, control messages become parameter
updates in worker threads) and a send task (answers, events and stats). The runtime's threads wake the send
task through `loop.call_soon_threadsafe`; inference never runs on the event loop. The messages themselves
are `wire`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from engine.runtime import Answer, Dropped
from wire import (
    BUSY,
    CLOSE_GOING_AWAY,
    CLOSE_IDLE,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    INVALID_PARAMS,
    DroppedEvent,
    ErrorEvent,
    FrameEvent,
    Hello,
    close_reason,
)

from .auth import token_matches, websocket_credentials
from .protocol import MessageError, parse_client_message
from .rates import Admission, MessageRate
from .sessions import Session, SessionLimitError, UpdateRefused
from .state import ServerState

logger = logging.getLogger(__name__)

#: Events waiting for a client that does not read; older ones are dropped past this.
MAX_PENDING_EVENTS = 32
#: Parameter updates a session may have queued; more are refused with a `busy` error.
MAX_PENDING_UPDATES = 4
#: Seconds to wait for a close frame to go out.
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class CloseRequest:
    """Why the receive task ended the connection."""

    code: int
    reason: str


async def websocket_stream(websocket: WebSocket) -> None:
    """Serve one streaming client from handshake to close."""
    state: ServerState = websocket.app.state.server
    settings = state.settings
    token, subprotocol = websocket_credentials(websocket.query_params.get("token"),
                                               websocket.scope.get("subprotocols", []))
    # Accept before refusing: only a close frame can carry a code and reason the client can read.
    await websocket.accept(subprotocol=subprotocol)
    if not token_matches(settings.token, token):
        state.metrics.rejected.labels("token").inc()
        await websocket.close(CLOSE_POLICY_VIOLATION, "missing or invalid token")
        return
    runtime = state.runtime
    if runtime is None or state.failure is not None:
        state.metrics.rejected.labels("not_ready").inc()
        await websocket.close(CLOSE_TRY_AGAIN_LATER, close_reason(state.not_ready_reason()))
        return
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:  # called from the runtime's encode thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: the session is gone
            loop.call_soon_threadsafe(wake.set)

    try:
        session = await state.sessions.open(runtime, settings.max_in_flight, notify)
    except SessionLimitError as error:
        state.metrics.rejected.labels("full").inc()
        await websocket.close(CLOSE_TRY_AGAIN_LATER, close_reason(str(error)))
        return
    logger.info("session %s opened (%d open)", session.id, len(state.sessions))
    close = None
    try:
        config = session.handle.config
        await websocket.send_text(Hello(session_id=session.id, width=config.width, height=config.height,
                                        max_in_flight=settings.max_in_flight, model=state.model_name,
                                        controlnet=settings.load.controlnet).to_json())
        close = await Connection(websocket, session, state, wake).run()
    except (WebSocketDisconnect, ClientDisconnected):
        pass
    finally:
        state.sessions.close(session)
        logger.info("session %s closed (%d open)", session.id, len(state.sessions))
    if close is not None:
        # Bounded: a client that does not read may never let the close frame out.
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, ClientDisconnected, TimeoutError):
            await asyncio.wait_for(websocket.close(close.code, close_reason(close.reason)), CLOSE_TIMEOUT_S)


class Connection:
    """The two tasks of one open session."""

    def __init__(self, websocket: WebSocket, session: Session, state: ServerState, wake: asyncio.Event):
        self.websocket = websocket
        self.session = session
        self.state = state
        self.settings = state.settings
        self.metrics = state.metrics
        self.runtime = state.runtime
        self.wake = wake
        self.events: deque[str] = deque(maxlen=MAX_PENDING_EVENTS)
        self.updates: set[asyncio.Task] = set()
        #: The send task is writing answers or events (a drain waits for it).
        self.sending = False

    async def run(self) -> CloseRequest | None:
        """Receive and send until the client leaves or must be closed; returns the close to send, if any."""
        receiving = asyncio.create_task(self.receive_loop(), name=f"ws-receive-{self.session.id}")
        sending = asyncio.create_task(self.send_loop(), name=f"ws-send-{self.session.id}")
        draining = asyncio.create_task(self.drain(), name=f"ws-drain-{self.session.id}")
        tasks = (receiving, sending, draining)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (*tasks, *self.updates):
                task.cancel()
            await asyncio.gather(*tasks, *self.updates, return_exceptions=True)
        for task in done:
            error = task.exception()
            if error is not None and not isinstance(error, (WebSocketDisconnect, ClientDisconnected)):
                logger.error("session %s failed: %r", self.session.id, error, exc_info=error)
        closing = next((task for task in (draining, receiving) if task in done and task.exception() is None), None)
        return None if closing is None else closing.result()

    async def drain(self) -> CloseRequest:
        """When the server drains: take no more frames (each is answered `dropped`), wait until the frames in
        flight are answered and sent (at most `--shutdown-timeout`), then close with 1001."""
        await self.session.draining.wait()
        deadline = time.monotonic() + self.settings.shutdown_timeout_s
        while (self.session.handle.in_flight or self.events or self.sending) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return CloseRequest(CLOSE_GOING_AWAY, "the server is shutting down; connect again")

    # ------------------------------------------------------------------ receiving

    async def receive_loop(self) -> CloseRequest | None:
        frame_limit, text_limit = self.settings.max_message_bytes, self.settings.max_control_bytes
        idle_timeout = self.settings.idle_timeout_s
        rate = MessageRate(self.settings.max_messages_per_s, time.monotonic())
        while True:
            try:
                message = await asyncio.wait_for(self.websocket.receive(), idle_timeout)
            except TimeoutError:
                if self.session.handle.in_flight:
                    continue  # waiting for us is not idling
                return CloseRequest(CLOSE_IDLE, f"no frame or message for {idle_timeout:g} s")
            if message["type"] == "websocket.disconnect":
                return None
            data, text = message.get("bytes"), message.get("text")
            admission = rate.admit(time.monotonic())
            if admission is Admission.CLOSE:
                logger.warning("session %s closed: a flood of messages (--max-message-rate)", self.session.id)
                return CloseRequest(CLOSE_POLICY_VIOLATION, f"over {rate.rate:g} messages a second, for seconds")
            if admission is Admission.REFUSE:
                self.refuse(data is not None)
                continue
            if data is not None:
                if len(data) > frame_limit:
                    return CloseRequest(CLOSE_TOO_BIG, f"frame of {len(data)} bytes exceeds the limit of "
                                                       f"{frame_limit} bytes")
                self.on_frame(data)
            elif text is not None:
                # Counted in characters first: never encode a huge text just to measure it.
                if len(text) > text_limit or len(text.encode(errors="surrogatepass")) > text_limit:
                    return CloseRequest(CLOSE_TOO_BIG, f"control message over the limit of {text_limit} bytes")
                self.on_text(text)

    def refuse(self, frame: bool) -> None:
        """A message over the session's rate: a frame is answered `dropped`, a control message `busy`."""
        self.metrics.rate_limited.labels("frame" if frame else "control").inc()
        if frame:
            self.session.handle.refuse()
        else:
            self.send_error(BUSY, f"over {self.settings.max_messages_per_s:g} messages a second; send fewer")

    def on_frame(self, data: bytes) -> None:
        if self.session.draining.is_set():
            self.session.handle.refuse()  # answered `dropped`: the session is about to close
            return
        self.session.handle.put(data)

    def on_text(self, text: str) -> None:
        try:
            message = parse_client_message(text, self.settings.max_prompt_chars)
        except MessageError as error:
            self.send_error(error.code, error.message)
            return
        if self.session.pending_updates >= MAX_PENDING_UPDATES:
            self.send_error(BUSY, f"{MAX_PENDING_UPDATES} updates are still being applied; send fewer")
            return
        task = asyncio.create_task(self.apply(message.engine_params()))
        self.updates.add(task)
        task.add_done_callback(self.updates.discard)

    async def apply(self, params: dict[str, object]) -> None:
        try:
            await self.session.update(params)
        except UpdateRefused as error:
            self.send_error(error.code, str(error))
        except ValueError as error:  # `Session.update` turns every failure into one
            self.send_error(INVALID_PARAMS, str(error))

    def send_error(self, code: str, message: str) -> None:
        self.metrics.message_errors.labels(code).inc()
        self.events.append(ErrorEvent(code=code, message=message).to_json())
        self.wake.set()

    # ------------------------------------------------------------------ sending

    async def send_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.settings.stats_interval_s
        next_stats = loop.time() + interval
        last_counts = None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.0, next_stats - loop.time()))
            self.wake.clear()  # before draining, so a wake-up during the drain is not lost
            self.sending = True
            try:
                while self.events:
                    await self.websocket.send_text(self.events.popleft())
                while (answer := self.session.handle.get_nowait()) is not None:
                    await self.deliver(answer)
            finally:
                self.sending = False
            if loop.time() >= next_stats:
                next_stats = loop.time() + interval
                stats = self.session.handle.stats
                counts = (stats.frames_in, stats.frames_out, stats.errors, stats.dropped)
                if counts != last_counts:  # idle sessions get no stats
                    last_counts = counts
                    await self.websocket.send_text(self.session.stats().to_json())

    async def deliver(self, answer: Answer) -> None:
        """Send one answer: dropped frames, an error event for a frame that could not be used, or a `frame`
        event followed by the frame's JPEG."""
        session = self.session
        if isinstance(answer, Dropped):
            for seq in answer.seqs:
                await self.websocket.send_text(DroppedEvent(seq=seq).to_json())
            return
        if answer.error is not None:
            await self.websocket.send_text(ErrorEvent(code=answer.error.code, message=answer.error.message,
                                                      seq=answer.seq).to_json())
            return
        latency = time.monotonic() - answer.arrival
        await self.websocket.send_text(FrameEvent(seq=answer.seq, latency_ms=round(latency * 1000, 3),
                                                  skipped=answer.skipped).to_json())
        await self.websocket.send_bytes(answer.jpeg)
        session.window.record(time.monotonic(), latency, answer.inference_s)
        session.publish(answer.jpeg)
        self.metrics.latency.observe(latency)
        self.metrics.inference.observe(answer.inference_s)
