"""`StreamConnection`'s bookkeeping against a scripted server: every answer names its frame."""

from __future__ import annotations

import asyncio

import pytest

from client.connection import StreamConnection
from wire import DroppedEvent, ErrorEvent, FrameEvent, Hello

HELLO = Hello(session_id="s", width=8, height=8, max_in_flight=2, model="tiny")


class ScriptedSocket:
    """A stand-in WebSocket: records what the client sends, yields what the test pushes."""

    def __init__(self):
        self.sent: list[bytes | str] = []
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.close_code, self.close_reason = 1000, ""

    async def send(self, message) -> None:
        self.sent.append(message)

    async def close(self) -> None:
        await self.incoming.put(None)

    def __aiter__(self):
        return self

    async def __anext__(self):
        message = await self.incoming.get()
        if message is None:
            raise StopAsyncIteration
        return message


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_dropped_frame_frees_its_slot_at_once_and_outputs_carry_their_own_seq():
    socket = ScriptedSocket()
    ticks = iter(range(100))
    connection = StreamConnection(socket, HELLO, clock=lambda: float(next(ticks)))
    async with connection:
        assert await connection.send_frame(b"f0") == 0.0 and await connection.send_frame(b"f1") == 1.0
        assert not await connection.wait_slot(timeout=0.05)  # two in flight: full
        await socket.incoming.put(DroppedEvent(seq=0).to_json())
        await settle()
        assert connection.in_flight == 1 and connection.dropped == 1
        assert await connection.send_frame(b"f2") == 2.0  # the drop freed a slot before any output came
        await socket.incoming.put(FrameEvent(seq=1, latency_ms=4.0, skipped=False).to_json())
        await socket.incoming.put(b"jpeg-1")
        await socket.incoming.put(ErrorEvent(code="bad_image", message="no", seq=2).to_json())
        output = await connection.next_output(timeout=5)
        assert (output.seq, output.jpeg, output.sent_at, output.server_latency_ms) == (1, b"jpeg-1", 1.0, 4.0)
        await settle()
        assert connection.in_flight == 0 and [error.seq for error in connection.errors] == [2]


@pytest.mark.parametrize("script", [
    [b"jpeg without an announcement"],
    [FrameEvent(seq=0, latency_ms=1.0, skipped=False).to_json(), DroppedEvent(seq=0).to_json()],
    [DroppedEvent(seq=5).to_json()],
], ids=["jpeg_first", "event_instead_of_jpeg", "unknown_seq"])
async def test_a_server_breaking_the_protocol_ends_the_session(script):
    socket = ScriptedSocket()
    connection = StreamConnection(socket, HELLO)
    async with connection:
        await connection.send_frame(b"f0")
        for message in script:
            await socket.incoming.put(message)
        await settle()
        assert connection.failure is not None and connection.failure.retryable
