"""Bad input over a real WebSocket: each gets an error event or a defined close, and the server goes on."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket

import httpx
import numpy as np
import pytest
import websockets
from server_testkit import connect, encode, frame, hello, next_event, random_frame, stream, wait_until

from server.serve import WS_SIZE_SLACK


async def assert_stream_goes_on(ws) -> None:
    log = await stream(ws, [frame(1), frame(2)], 2)
    assert len(log.outputs) == 2 and not log.of_type("error")


async def closed_with(ws) -> websockets.frames.Close:
    """Read until the server closes; the close frame it sent."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        for _ in range(100):
            await asyncio.wait_for(ws.recv(), 30)
    assert closed.value.rcvd is not None, "the server sent no close frame"
    return closed.value.rcvd


@pytest.mark.parametrize(("payload", "code"), [
    (b"definitely not an image", "bad_image"),
    (frame(3)[: len(frame(3)) // 2], "bad_image"),
    (b"", "empty_frame"),
    (encode(np.zeros((600, 600, 3), np.uint8), "PNG"), "image_too_large"),
    (encode(np.zeros((64, 64, 3), np.uint8), "BMP"), "unsupported_format"),
], ids=["not_an_image", "truncated", "zero_bytes", "too_many_pixels", "bmp"])
async def test_bad_frame_gets_an_error_event_and_the_stream_goes_on(server, payload, code):
    async with connect(server.ws_url) as ws:
        await hello(ws)
        await ws.send(payload)
        error = await next_event(ws, "error")
        assert error["code"] == code, error
        assert error["message"]
        await assert_stream_goes_on(ws)


@pytest.mark.parametrize(("text", "code"), [
    ("{not json", "invalid_json"),
    ("[1, 2]", "invalid_message"),
    ('{"type": "params", "guidance_scale": "high"}', "invalid_message"),
    ('{"type": "params", "seed": 1.5}', "invalid_message"),
    ('{"type": "params", "similarity_filter": 1}', "invalid_message"),
    ('{"type": "prompt", "prompt": 42}', "invalid_message"),
    ('{"type": "prompt"}', "invalid_message"),
    ('{"type": "prompt", "prompt": "x", "colour": "red"}', "invalid_message"),
    ('{"type": "params", "width": 128}', "invalid_message"),
    ('{"type": "params"}', "invalid_message"),
    ('{"type": "dance"}', "unknown_message_type"),
    ('{"prompt": "no type"}', "unknown_message_type"),
    (json.dumps({"type": "prompt", "prompt": "x" * 201}), "prompt_too_long"),
    (json.dumps({"type": "params", "negative_prompt": "x" * 201}), "prompt_too_long"),
    ('{"type": "params", "similarity_threshold": 2.0}', "invalid_params"),
    ('{"type": "params", "t_index_list": [45, 10]}', "invalid_params"),
], ids=["invalid_json", "not_an_object", "wrong_type_float", "wrong_type_int", "wrong_type_bool",
        "wrong_type_prompt", "missing_prompt", "unknown_field", "cold_param", "no_param", "unknown_type",
        "missing_type", "prompt_too_long", "negative_prompt_too_long", "bad_value", "bad_schedule"])
async def test_bad_control_message_gets_an_error_event_and_changes_nothing(server, text, code):
    async with connect(server.ws_url) as ws:
        session = server.state.sessions.get((await hello(ws))["session_id"])
        config_before = session.handle.config
        await ws.send(text)
        error = await next_event(ws, "error")
        assert error["code"] == code, error
        assert session.handle.config == config_before
        await assert_stream_goes_on(ws)


async def test_message_over_the_size_limit_closes_with_1009(server):
    limit = server.settings.max_message_bytes
    for size in (limit + 1, limit + WS_SIZE_SLACK + 1024):
        async with connect(server.ws_url) as ws:
            await hello(ws)
            await ws.send(b"\xff" * size)
            close = await closed_with(ws)
        assert close.code == 1009
        assert close.reason, "1009 without a reason"
    async with connect(server.ws_url) as ws:
        await hello(ws)
        await assert_stream_goes_on(ws)


async def test_sessions_over_the_limit_close_with_1013_and_health_says_503(server):
    limit = server.settings.max_sessions
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        clients = [await connect(server.ws_url) for _ in range(limit)]
        try:
            for ws in clients:
                await hello(ws)
            extra = await connect(server.ws_url)
            close = await closed_with(extra)
            assert close.code == 1013 and "full" in close.reason
            health = await rest.get("/health")
            assert health.status_code == 503
            assert health.json()["accepting"] is False and health.json()["sessions"] == limit
            await clients.pop().close()
            await wait_until(lambda: len(server.state.sessions) < limit)
            async with connect(server.ws_url) as again:
                await hello(again)
                await assert_stream_goes_on(again)
        finally:
            for ws in clients:
                await ws.close()
        assert (await rest.get("/health")).status_code == 200


# ---------------------------------------------------------------- raw sockets: misbehaving clients


def raw_websocket(base_url: str, receive_buffer: int | None = None) -> socket.socket:
    """A hand-made WebSocket connection (so the test can misbehave at the frame level)."""
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def binary_frame_header(length: int) -> bytes:
    """Header of a final, masked binary frame announcing `length` payload bytes (mask key all zero)."""
    if length < 126:
        size = bytes([0x80 | length])
    elif length < 65536:
        size = bytes([0x80 | 126]) + length.to_bytes(2, "big")
    else:
        size = bytes([0x80 | 127]) + length.to_bytes(8, "big")
    return b"\x82" + size + b"\x00\x00\x00\x00"  # a zero mask leaves the payload as it is


async def test_client_disconnecting_mid_frame_leaks_nothing(server):
    sock = await asyncio.to_thread(raw_websocket, server.base_url)
    await wait_until(lambda: len(server.state.sessions) == 1)
    data = frame(5)
    sock.sendall(binary_frame_header(len(data)) + data[: len(data) // 3])
    sock.close()
    await wait_until(lambda: len(server.state.sessions) == 0)
    async with connect(server.ws_url) as ws:
        await hello(ws)
        await assert_stream_goes_on(ws)


async def test_client_that_never_reads_loses_its_own_frames_only(server):
    limit = server.settings.max_in_flight
    sock = await asyncio.to_thread(raw_websocket, server.base_url, 4096)
    try:
        await wait_until(lambda: len(server.state.sessions) == 1)
        (silent,) = list(server.state.sessions)
        data = random_frame(9)
        burst = 30
        highest_in_flight = 0
        async with connect(server.ws_url) as ws:
            await hello(ws)
            reader = asyncio.create_task(stream(ws, [random_frame(seed) for seed in range(4)], limit))
            for _ in range(burst):
                await asyncio.to_thread(sock.sendall, binary_frame_header(len(data)) + data)
                highest_in_flight = max(highest_in_flight, silent.handle.in_flight)
            log = await reader
        assert len(log.outputs) == 4 and not log.of_type("error")
        await wait_until(lambda: silent.handle.stats.frames_in == burst)
        stats = silent.handle.stats
        assert stats.dropped > 0
        assert highest_in_flight <= limit and silent.handle.in_flight <= limit
    finally:
        sock.close()
    await wait_until(lambda: len(server.state.sessions) == 0)
