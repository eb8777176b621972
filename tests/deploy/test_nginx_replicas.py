"""Two server replicas behind Debian's nginx, configured by the same `deploy/nginx.conf` docker-compose mounts.

Only the replica addresses (the included `upstreams.conf`) and nginx's listening port are test-specific.
Skips, saying why, when nginx is not installed.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets

from client.loadtest import LoadTestConfig, run_load_test, synthetic_frames

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx.conf"
COMPOSE_LISTEN = "listen 8080;"
REPLICA_IDS = ("r1", "r2")
READY_TIMEOUT_S = 60.0
RECV_TIMEOUT_S = 15.0


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, log: Path, ready) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited ({process.returncode}): {log.read_text()}")
        try:
            if ready(httpx.get(url, timeout=2.0)):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready within {READY_TIMEOUT_S} s: {log.read_text()}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def upstreams_conf(ports: dict[str, int]) -> str:
    """The `upstreams.conf` deploy/nginx.conf includes, for replicas `{replica_id: port}` on loopback."""
    servers = "".join(f"    server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;\n" for port in ports.values())
    blocks = [f"upstream streamdiff {{\n    least_conn;\n{servers}}}\n"]
    blocks += [f"upstream replica_{replica} {{\n    server 127.0.0.1:{port};\n}}\n" for replica, port in ports.items()]
    return "".join(blocks)


@dataclass
class Cluster:
    """The replicas (`{replica_id: base URL}`) and nginx's base URL."""

    replicas: dict[str, str]
    proxy: str

    @property
    def proxy_ws(self) -> str:
        return self.proxy.replace("http://", "ws://") + "/ws"

    def sessions(self, replica: str) -> dict[str, dict]:
        """The sessions a replica itself reports (asked directly, not through nginx)."""
        listed = httpx.get(f"{self.replicas[replica]}/api/sessions", timeout=5.0).json()["sessions"]
        return {session["id"]: session for session in listed}

    def frames_out(self, replica: str) -> float:
        text = httpx.get(f"{self.replicas[replica]}/metrics", timeout=5.0).text
        match = re.search(r"^streamdiff_frames_out_total (\S+)$", text, re.M)
        return float(match[1]) if match else 0.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    nginx = _nginx_binary()
    if nginx is None:
        reason = "nginx is not installed (apt-get install nginx): the replica test needs it"
        print(reason)
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("replicas")
    ports = {replica: _free_port() for replica in REPLICA_IDS}
    processes: list[subprocess.Popen] = []
    try:
        for replica, port in ports.items():
            log = workdir / f"{replica}.log"
            with log.open("wb") as out:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "server", "--model", "tiny", "--port", str(port), "--width", "64",
                     "--height", "64", "--replica-id", replica, "--log-level", "warning"],
                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT))
        proxy_port = _free_port()
        conf = NGINX_CONF.read_text()
        assert conf.count(COMPOSE_LISTEN) == 1
        (workdir / "nginx.conf").write_text(conf.replace(COMPOSE_LISTEN, f"listen 127.0.0.1:{proxy_port};"))
        (workdir / "upstreams.conf").write_text(upstreams_conf(ports))
        nginx_log = workdir / "nginx.log"
        with nginx_log.open("wb") as out:
            processes.append(subprocess.Popen(
                [nginx, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", "daemon off;"],
                stdout=out, stderr=subprocess.STDOUT))
        for (replica, port), process in zip(ports.items(), processes, strict=False):
            _wait_for(f"http://127.0.0.1:{port}/health", process, workdir / f"{replica}.log",
                      lambda response: response.json().get("status") == "ready")
        proxy = f"http://127.0.0.1:{proxy_port}"
        _wait_for(f"{proxy}/health", processes[-1], nginx_log, lambda response: response.status_code == 200)
        yield Cluster({replica: f"http://127.0.0.1:{port}" for replica, port in ports.items()}, proxy)
    finally:
        for process in reversed(processes):
            _stop(process)


async def test_load_test_through_nginx_uses_both_replicas(cluster):
    before = {replica: cluster.frames_out(replica) for replica in REPLICA_IDS}
    summary, reports = await run_load_test(LoadTestConfig(url=cluster.proxy_ws, streams=4, duration_s=3.0))
    served = {replica: cluster.frames_out(replica) - before[replica] for replica in REPLICA_IDS}

    assert summary.errors == 0 and summary.received > 0
    assert all(report.received > 0 for report in reports)
    assert all(len(report.session_ids) == 1 for report in reports)  # no stream lost its session
    owners = [report.session_ids[0].split("-", 1)[0] for report in reports]
    assert set(owners) == set(REPLICA_IDS)
    # Each replica sent exactly the outputs of the streams whose sessions carry its id.
    for replica in REPLICA_IDS:
        assert served[replica] == sum(report.received for report, owner in zip(reports, owners, strict=True)
                                      if owner == replica)


async def _open_session(url: str):
    ws = await websockets.connect(url, open_timeout=RECV_TIMEOUT_S, close_timeout=5)
    hello = json.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))
    assert hello["type"] == "hello"
    return ws, hello["session_id"]


async def _one_output(ws, frame: bytes) -> bytes:
    await ws.send(frame)
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while True:
        message = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        if isinstance(message, bytes):
            return message


async def test_session_rest_calls_through_nginx_reach_the_owning_replica(cluster):
    frame = synthetic_frames(64, 64, count=1)[0]
    opened = [await _open_session(cluster.proxy_ws) for _ in range(4)]
    try:
        ids = [session_id for _, session_id in opened]
        for ws, _ in opened:
            assert (await _one_output(ws, frame))[:2] == b"\xff\xd8"
        owned = {replica: cluster.sessions(replica) for replica in REPLICA_IDS}
        # Every session lives on exactly one replica, the one its id names, and both replicas have some.
        assert sorted(ids) == sorted(session for sessions in owned.values() for session in sessions)
        for replica, sessions in owned.items():
            assert sessions and all(session.startswith(f"{replica}-") for session in sessions)

        async with httpx.AsyncClient(base_url=cluster.proxy, timeout=10.0) as proxy:
            for session_id in ids:
                prompt = f"a watercolor of {session_id}"
                response = await proxy.post(f"/api/sessions/{session_id}/prompt", json={"prompt": prompt})
                assert response.status_code == 200, response.text
                assert response.json()["id"] == session_id
                assert cluster.sessions(session_id.split("-", 1)[0])[session_id]["prompt"] == prompt
            for replica in REPLICA_IDS:  # a well-formed id its replica does not know: that replica's 404
                response = await proxy.post(f"/api/sessions/{replica}-000000000000/prompt", json={"prompt": "x"})
                assert response.status_code == 404 and "no session" in response.json()["detail"]
            response = await proxy.post("/api/sessions/zz-000000000000/prompt", json={"prompt": "x"})
            assert response.status_code == 502  # no replica has that id: nginx has no upstream for it
        for ws, _ in opened:  # the sessions still stream after the REST calls
            assert (await _one_output(ws, frame))[:2] == b"\xff\xd8"
    finally:
        for ws, _ in opened:
            await ws.close()
