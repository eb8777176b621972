"""A real server (`python -m server`, tiny model, 64×64) on a free loopback port for the client tests."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    """A `python -m server` subprocess; `start`/`stop` may be called again (same port) to restart it."""

    port: int
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", "tiny", "--port", str(self.port), "--width", "64",
             "--height", "64"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.http_url}/health", timeout=2.0).json().get("status") == "ready":
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server was not ready within {timeout_s} s: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)

    def counters(self) -> dict[str, float]:
        """The server's `streamdiff_*_total` counters from `/metrics`."""
        text = httpx.get(f"{self.http_url}/metrics", timeout=5.0).text
        return {match[1]: float(match[2]) for match in re.finditer(r"^(streamdiff_\w+_total) (\S+)$", text, re.M)}


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    """One server for the client tests (they compare counter deltas, so they may share it; one test restarts it)."""
    process = ServerProcess(free_port(), tmp_path_factory.mktemp("server") / "server.log")
    process.start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def repo() -> Path:
    """The repository root (the working directory for `python -m client...` subprocesses)."""
    return REPO


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on."""
    return free_port()
