"""Graceful shutdown (issue 28 item 4): on SIGTERM the server stops taking sessions (`/health` says `draining`),
answers the frames in flight, closes each session with 1001 and exits within `--shutdown-timeout`; a second
SIGTERM exits at once.

The server runs in a thread here (so a frame's decoding can be slowed to keep it in flight); the signal arrives
through the same `handle_exit` that uvicorn's signal handler calls.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest
import websockets
from server_testkit import TEST_SETTINGS, connect, hello, random_frame

import engine.runtime
from server.app import create_app
from server.serve import DrainingServer, serving_in_thread, uvicorn_config

SLOW = random_frame(77)


@pytest.fixture
def slow_decode(monkeypatch):
    """Frame `SLOW` takes `delay[0]` seconds to decode (sleeping, so the test does not depend on the CPU)."""
    delay = [1.0]
    real = engine.runtime.decode_image

    def decode(data, *args, **kwargs):
        if data == SLOW:
            time.sleep(delay[0])
        return real(data, *args, **kwargs)

    monkeypatch.setattr(engine.runtime, "decode_image", decode)
    return delay


def draining_server(server_engine, shutdown_timeout_s: float) -> DrainingServer:
    settings = TEST_SETTINGS.replace(shutdown_timeout_s=shutdown_timeout_s)
    app = create_app(settings, engine=server_engine)
    return DrainingServer(uvicorn_config(app, settings), app.state.server, shutdown_timeout_s)


async def test_sigterm_drains_answers_what_is_in_flight_and_closes_with_1001(server_engine, slow_decode):
    server = draining_server(server_engine, shutdown_timeout_s=8.0)
    with serving_in_thread(server) as base_url:
        ws_url = base_url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as ws, httpx.AsyncClient(base_url=base_url, timeout=10) as rest:
            await hello(ws)
            await ws.send(SLOW)  # in flight for a second
            await asyncio.sleep(0.2)
            started = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)
            await asyncio.sleep(0.2)
            health = await rest.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "draining"
            with pytest.raises(websockets.ConnectionClosed) as refused:  # no new session while draining
                async with connect(ws_url) as late:
                    await asyncio.wait_for(late.recv(), 10)
                    await asyncio.wait_for(late.recv(), 10)
            assert refused.value.rcvd.code == 1013 and "shutting down" in refused.value.rcvd.reason
            await ws.send(random_frame(1))  # sent while draining: answered `dropped`, not taken
            answers = []
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    answers.append(await asyncio.wait_for(ws.recv(), 10))
            assert closed.value.rcvd.code == 1001 and "shutting down" in closed.value.rcvd.reason
        events = [json.loads(item) for item in answers if isinstance(item, str)]
        frames = [event for event in events if event["type"] == "frame"]
        assert [event["seq"] for event in frames] == [0]  # the frame in flight was answered...
        assert any(isinstance(item, bytes) for item in answers)  # ...with its JPEG
        assert {"type": "dropped", "seq": 1} in events
        deadline = time.monotonic() + 8.0 + 2.0
        while server.started and not server.should_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert time.monotonic() - started < 8.0 + 2.0  # the server stopped within --shutdown-timeout (plus the join)


async def test_a_second_sigterm_exits_at_once(server_engine, slow_decode):
    slow_decode[0] = 6.0  # a frame in flight that would hold the drain for its whole budget
    server = draining_server(server_engine, shutdown_timeout_s=8.0)
    done = threading.Event()
    with serving_in_thread(server) as base_url:
        ws_url = base_url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as ws:
            await hello(ws)
            await ws.send(SLOW)
            await asyncio.sleep(0.2)
            server.handle_exit(signal.SIGTERM, None)
            await asyncio.sleep(0.3)
            assert not server.should_exit  # still draining: the frame is in flight
            started = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)
            assert server.force_exit and server.should_exit
            name = f"uvicorn-{id(server):x}"  # this server's thread (`serving_in_thread`)
            while time.monotonic() - started < 5:
                if not any(thread.name == name and thread.is_alive() for thread in threading.enumerate()):
                    done.set()
                    break
                await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    server.state.close()  # a real process ends here; this one stops the runtime threads it left running
    assert done.is_set() and elapsed < 3.0


@pytest.mark.slow
async def test_sigterm_to_a_real_server_process_closes_sessions_with_1001_and_exits(tmp_path):
    """`python -m server` under a real SIGTERM: uvicorn alone closed sessions with 1012 and never said draining."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "server", "--model", "tiny", "--width", "64", "--height", "64",
                                "--port", str(port), "--shutdown-timeout", "5"],
                               cwd=Path(__file__).resolve().parents[2], stdout=log, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as rest:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
                try:
                    if (await rest.get("/health")).json()["status"] == "ready":
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                await asyncio.sleep(0.25)
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await hello(ws)
            await ws.send(random_frame(3))
            started = time.monotonic()
            os.kill(process.pid, signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert closed.value.rcvd.code == 1001, (tmp_path / "server.log").read_text()
        process.wait(timeout=10)
        assert time.monotonic() - started < 5 + 2, "the process outlived --shutdown-timeout"
        assert "draining" in (tmp_path / "server.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        log.close()


def test_compose_gives_every_replica_longer_to_stop_than_its_drain():
    import re
    from pathlib import Path

    compose = (Path(__file__).resolve().parents[2] / "docker-compose.yml").read_text()
    grace = [int(value) for value in re.findall(r"^  stop_grace_period: (\d+)s$", compose, re.MULTILINE)]
    timeouts = [float(value) for value in re.findall(r'STREAMDIFF_SHUTDOWN_TIMEOUT: "([\d.]+)"', compose)]
    assert len(grace) == 2 and len(timeouts) == 2  # the CPU and the GPU replica anchors
    assert min(grace) > max(timeouts), (grace, timeouts)
