"""The browser page in Debian's headless chromium with a fake camera, read over the DevTools protocol."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import websockets
from server_testkit import connect, hello, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--remote-debugging-port=0",
]
PAGE_TIMEOUT_S = 90.0

if CHROMIUM is None:
    print("test_server_browser: skipped, chromium is not installed (apt-get install -y chromium)")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)"),
    pytest.mark.slow,
]


class Page:
    """One page over the Chrome DevTools protocol: evaluate JavaScript and read the result."""

    def __init__(self, connection):
        self.connection = connection
        self.next_id = 0

    async def evaluate(self, expression: str):
        self.next_id += 1
        await self.connection.send(json.dumps({"id": self.next_id, "method": "Runtime.evaluate",
                                               "params": {"expression": expression, "returnByValue": True}}))
        while True:
            reply = json.loads(await asyncio.wait_for(self.connection.recv(), 30))
            if reply.get("id") == self.next_id:
                return reply["result"]["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = PAGE_TIMEOUT_S):
        """Poll `expression` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.25)
        raise AssertionError(f"{expression!r} stayed falsy; page says: "
                             f"{await self.evaluate('document.body.innerText')!r}")


@asynccontextmanager
async def open_page(url: str, profile: Path, flags: list[str] = CHROMIUM_FLAGS) -> AsyncIterator[Page]:
    """Start chromium on `url` with a fresh profile; the page's DevTools connection."""
    process = subprocess.Popen([CHROMIUM, *flags, f"--user-data-dir={profile}", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        await wait_until(lambda: port_file.exists() and port_file.read_text().strip(), timeout=PAGE_TIMEOUT_S)
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient(timeout=10) as http:
            targets = []
            for _ in range(100):
                targets = [target for target in (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
                           if target["type"] == "page" and target["url"].startswith(url)]
                if targets:
                    break
                await asyncio.sleep(0.1)
        assert targets, "chromium opened no page"
        async with websockets.connect(targets[0]["webSocketDebuggerUrl"], max_size=None) as devtools:
            yield Page(devtools)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(15)


async def test_page_streams_the_fake_camera_and_updates_the_prompt(server, tmp_path):
    async with open_page(server.base_url + "/", tmp_path / "profile") as page:
        await page.wait_for("window.streamdiff && window.streamdiff.framesReceived >= 3")
        assert int(await page.evaluate("document.getElementById('frames-received').textContent")) >= 3
        assert await page.evaluate("document.getElementById('camera').options.length") >= 1
        assert "/view/" in await page.evaluate("document.getElementById('viewer-link').href")
        assert await page.evaluate("document.getElementById('controlnet').hidden")  # this server has none
        session_id = await page.evaluate("window.streamdiff.hello.session_id")
        await page.evaluate("document.getElementById('prompt').value = 'charcoal drawing';"
                            "document.getElementById('prompt-form').requestSubmit(); true")
        session = server.state.sessions.get(session_id)
        await wait_until(lambda: session.handle.config.prompt == "charcoal drawing")
        received = await page.evaluate("window.streamdiff.framesReceived")
        await page.wait_for(f"window.streamdiff.framesReceived > {received}")
        assert session.handle.stats.dropped == 0  # the page keeps to max_in_flight
        # A second prompt blends with the first; the slider (the second's weight) re-blends as it moves.
        await page.evaluate("document.getElementById('prompt-2').value = 'neon edges';"
                            "document.getElementById('blend').value = '25';"
                            "document.getElementById('prompt-form').requestSubmit(); true")
        await wait_until(lambda: session.handle.config.prompts == (("charcoal drawing", 0.75), ("neon edges", 0.25)))
        await page.evaluate("const slider = document.getElementById('blend'); slider.value = '60';"
                            "slider.dispatchEvent(new Event('input')); true")
        await wait_until(lambda: session.handle.config.prompts == (("charcoal drawing", 0.4), ("neon edges", 0.6)))
        assert await page.evaluate("document.getElementById('blend-value').textContent") == "60%"
        await page.evaluate("const pick = document.getElementById('temporal'); pick.value = 'flow';"
                            "pick.dispatchEvent(new Event('change')); true")
        await wait_until(lambda: session.handle.config.temporal == "flow")
        received = await page.evaluate("window.streamdiff.framesReceived")
        await page.wait_for(f"window.streamdiff.framesReceived > {received}")
    await wait_until(lambda: len(server.state.sessions) == 0)


async def test_page_says_when_the_server_is_full(start_server, tmp_path):
    with start_server(max_sessions=1) as live:
        async with connect(live.ws_url) as occupant:
            await hello(occupant)
            async with open_page(live.base_url + "/", tmp_path / "profile") as page:
                message = await page.wait_for("!document.getElementById('message').hidden && "
                                              "document.getElementById('message').textContent")
        assert "full" in message


async def test_page_says_when_the_camera_is_blocked(server, tmp_path):
    flags = [flag for flag in CHROMIUM_FLAGS if flag != "--use-fake-ui-for-media-stream"]
    async with open_page(server.base_url + "/", tmp_path / "profile", [*flags, "--deny-permission-prompts"]) as page:
        message = await page.wait_for("!document.getElementById('message').hidden && "
                                      "document.getElementById('message').textContent")
        assert "blocked" in message
        assert await page.evaluate("window.streamdiff.framesReceived") == 0
    await wait_until(lambda: len(server.state.sessions) == 0)


async def test_page_with_a_token_streams_but_never_shows_it(start_server, tmp_path):
    token = "page-secret-7"
    with start_server(token=token) as live:
        async with open_page(f"{live.base_url}/?token={token}", tmp_path / "profile") as page:
            await page.wait_for("window.streamdiff && window.streamdiff.framesReceived >= 2")
            assert token in await page.evaluate("document.getElementById('viewer-link').href")
            assert token not in await page.evaluate("document.body.innerText")


async def test_page_shows_the_controlnet_and_drives_its_parameters(controlnet_server, tmp_path):
    server = controlnet_server
    async with open_page(server.base_url + "/", tmp_path / "profile") as page:
        await page.wait_for("window.streamdiff && window.streamdiff.framesReceived >= 2")
        assert not await page.evaluate("document.getElementById('controlnet').hidden")
        assert "tiny-controlnet" in await page.evaluate("document.getElementById('controlnet-name').textContent")
        session = server.state.sessions.get(await page.evaluate("window.streamdiff.hello.session_id"))
        await page.evaluate("const slider = document.getElementById('controlnet-scale'); slider.value = '40';"
                            "slider.dispatchEvent(new Event('input')); true")
        await wait_until(lambda: session.handle.config.controlnet_scale == 0.4)
        assert await page.evaluate("document.getElementById('controlnet-scale-value').textContent") == "0.40"
        await page.evaluate("const box = document.getElementById('show-control'); box.checked = true;"
                            "box.dispatchEvent(new Event('change')); true")
        await wait_until(lambda: session.handle.config.show_control)
        received = await page.evaluate("window.streamdiff.framesReceived")
        await page.wait_for(f"window.streamdiff.framesReceived > {received}")
    await wait_until(lambda: len(server.state.sessions) == 0)
