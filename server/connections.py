"""uvicorn's HTTP and WebSocket protocols, bounded in what one connection may cost before the app sees it.

The app's own limits (`server.guard`, `server.ws`) start once a request or message has been parsed; these
classes bound what happens below that, where one unauthenticated client could otherwise stall the event loop
or grow the process without bound:

- HTTP: request headers must finish within a time (`header_timeout_s`); the URL, the number of headers and
  their bytes are counted as they arrive (414 or 431, then the connection closes); connections past
  `max_connections` are closed as they open.
- WebSocket: a peer that does not read stops being read (pings included: each one queues a pong), and once
  the server has sent its close frame the peer's input is never parsed again; the connection is cut
  (aborted, not closed: closing waits for a buffer that may never drain) after a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestLimits:
    """What one HTTP request line and header block may hold.

    Args:
        max_url_bytes (`int`, defaults to 8 KiB): longest request target; longer ones get 414.
        max_headers (`int`, defaults to 100): most header fields; more get 431.
        max_header_bytes (`int`, defaults to 16 KiB): most bytes of header names and values; more get 431.
    """

    max_url_bytes: int = 8 * 1024
    max_headers: int = 100
    max_header_bytes: int = 16 * 1024

    @property
    def max_head_bytes(self) -> int:
        """Most bytes of a whole request head: its line, its fields and their separators."""
        return self.max_url_bytes + self.max_header_bytes + 4 * self.max_headers + 64


class RequestTooLarge(Exception):
    """Raised inside the HTTP parser's callbacks to stop parsing a request that is over a `RequestLimits`."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def guarded_http_protocol(header_timeout_s: float, max_connections: int,
                          limits: RequestLimits = RequestLimits()) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol, closing connections that are over `max_connections`, slow with headers or
    over `limits`.

    uvicorn arms its keep-alive timer only after a first response, so a client that opens a connection and
    never finishes its request headers holds a file descriptor for ever; a thousand such clients lock
    everyone out. Here each request must finish its headers within `header_timeout_s` of its first byte (or
    of the connection's opening), and connections past `max_connections` are closed as soon as they open.
    uvicorn also appends every header it is sent and grows the URL by concatenation (quadratic), so both are
    counted as the parser delivers them and a request over `limits` is answered at once and its connection
    closed; it never reaches the app or the access log.
    """

    class GuardedHttpProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None
        _refusal: RequestTooLarge | None = None
        _url_bytes = 0
        _header_bytes = 0
        _head_bytes = 0
        _in_head = True

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                logger.warning("refusing a connection: %d are open (--max-connections)", len(self.connections) - 1)
                transport.close()
                return
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_header_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # httptools hands a header over only once it is complete, buffering it meanwhile: an endless one
            # is caught here, by the bytes of the head read so far.
            if self._in_head and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_head_bytes:
                    self._refusal = RequestTooLarge(431, f"request head over {limits.max_head_bytes} bytes")
                    self.send_400_response("")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._url_bytes = self._header_bytes = self._head_bytes = 0
            self._in_head = True
            self._arm_header_timer()

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes > limits.max_url_bytes:
                self._refuse(414, f"request target over {limits.max_url_bytes} bytes")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_bytes += len(name) + len(value)
            if len(self.headers) >= limits.max_headers:
                self._refuse(431, f"over {limits.max_headers} request header fields")
            if self._header_bytes > limits.max_header_bytes:
                self._refuse(431, f"request header fields over {limits.max_header_bytes} bytes")
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm_header_timer()
            super().on_headers_complete()

        def handle_websocket_upgrade(self) -> None:
            self._disarm_header_timer()
            super().handle_websocket_upgrade()

        def send_400_response(self, msg: str) -> None:
            # uvicorn answers every parser error with 400; a request stopped for its size gets its own status.
            refusal, self._refusal = self._refusal, None
            if refusal is None:
                super().send_400_response(msg)
                return
            body = f"{refusal.reason}\n".encode()
            self.transport.write(b"".join([
                STATUS_LINE[refusal.status], b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: ", str(len(body)).encode(), b"\r\n", b"connection: close\r\n\r\n", body]))
            self.transport.close()

        def _refuse(self, status: int, reason: str) -> None:
            logger.debug("refusing a request: %s", reason)
            self._refusal = RequestTooLarge(status, reason)
            raise self._refusal

        def _arm_header_timer(self) -> None:
            self._disarm_header_timer()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            logger.debug("closing a connection whose request headers took over %g s", header_timeout_s)
            self.transport.close()

    return GuardedHttpProtocol


def guarded_websocket_protocol(close_timeout_s: float, drain_bytes: int = 1024 * 1024) -> type[asyncio.Protocol]:
    """uvicorn's websockets (sans-I/O) protocol with its output bounded and closed connections left unparsed.

    - While the transport's write buffer is over its high-water mark the peer is not read: a client that
      sends pings and never reads would otherwise queue a pong per ping in the server's memory.
    - Once the server has sent its close frame, nothing the peer sends is parsed (nor inflated) again: uvicorn
      would parse on until the peer's close frame comes, which it may never send. Up to `drain_bytes` are
      read and discarded, so a peer that answers the close gets a clean end (closing a socket with unread
      input resets it, and the reset can destroy the close frame on its way); past that reading stops.
    - `close_timeout_s` after the close frame (or the app's end), a connection still open is aborted:
      `transport.close()` waits for a write buffer that a peer that does not read never drains.
    """

    class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
        _output_paused = False
        _drained = 0

        def pause_writing(self) -> None:
            super().pause_writing()
            self._output_paused = True
            self.transport.pause_reading()

        def resume_writing(self) -> None:
            super().resume_writing()
            self._output_paused = False
            if not self.read_paused and not self.transport.is_closing():
                self.transport.resume_reading()

        def data_received(self, data: bytes) -> None:
            if not (self.close_sent and self.handshake_complete):
                super().data_received(data)
                return
            self._drained += len(data)
            if self._drained > drain_bytes:
                self.transport.pause_reading()

        async def receive(self):  # type: ignore[override]
            message = await super().receive()
            if self._output_paused and not self.transport.is_closing():
                self.transport.pause_reading()  # uvicorn resumed reading for its queue; output still rules
            return message

        async def send(self, message) -> None:  # type: ignore[override]
            closing = self.close_sent
            await super().send(message)
            if self.close_sent and not closing and self.close_timer is not None:
                # uvicorn's timer closes (flushing for ever); abort instead. The peer gets our end of the
                # stream at once, so a client that reads sees the close frame and leaves.
                self.close_timer.cancel()
                self.close_timer = self.loop.call_later(close_timeout_s, self.transport.abort)
                if self.transport.can_write_eof():
                    self.transport.write_eof()

        async def run_asgi(self) -> None:
            await super().run_asgi()
            if self.close_timer is None and not self.disconnected:
                self.close_timer = self.loop.call_later(close_timeout_s, self.transport.abort)

    return GuardedWebSocketProtocol
