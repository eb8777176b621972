"""Every built-in family starts under the default `--backend auto` and serves a frame (issue 26 item 1).

Each case loads through the server's own start path (`create_app` without an engine: the background loader,
`auto`'s timing workload, the chosen backend's exports) with a fresh engine cache, then streams one frame.
Before the fix `tiny-sdxl` stopped at load: `auto` timed an SDXL UNet with SD-style conditioning.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from server_testkit import TEST_SETTINGS, TEST_STREAM, connect, frame, hello, stream

from engine.backends.cache import CACHE_DIR_ENV
from engine.config import LoadConfig, LoraSpec
from server.app import create_app
from server.serve import background_server

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    from tests.engine.lora_files import make_lora

    path, _ = make_lora(tmp_path_factory.mktemp("lora"))
    return path


CASES = {
    "tiny": (dict(model="tiny"), {}),
    "tiny-sdxl": (dict(model="tiny-sdxl"), {}),
    "demo": (dict(model="demo"), {}),
    "tiny+controlnet": (dict(model="tiny", controlnet="random"), {}),
    "tiny+lora": (dict(model="tiny"), {}),
    "tiny+bank": (dict(model="tiny"), dict(temporal="bank")),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_each_family_starts_under_auto_and_serves_a_frame(case, tmp_path, monkeypatch, request):
    load_changes, stream_changes = CASES[case]
    if case == "tiny+lora":
        load_changes = dict(load_changes, loras=(LoraSpec(str(request.getfixturevalue("lora_file"))),))
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    load = LoadConfig(backend="auto", **load_changes)
    settings = TEST_SETTINGS.replace(load=load, stream=TEST_STREAM.replace(**stream_changes))
    app = create_app(settings)
    with background_server(app, settings) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while (health := (await client.get("/health")).json())["status"] == "loading":
                assert time.monotonic() < deadline, "still loading"
                await asyncio.sleep(0.5)
            assert health["status"] == "ready", health
        runtime = app.state.server.runtime
        assert runtime.engine.config.backend != "auto"  # auto chose one
        async with connect(base_url.replace("http://", "ws://") + "/ws") as ws:
            await hello(ws)
            log = await stream(ws, [frame(1), frame(2)], 2)
            assert len(log.outputs) == 2 and not log.of_type("error"), log.events
