"""Inference failures a deployment meets (issue 28 item 2), injected through a runner that raises on chosen calls:
the failing frame is answered with an `error` event naming it, the session goes on, `/health` turns `degraded`
with the reason (and a metric counts it), and recovery turns it back."""

from __future__ import annotations

import asyncio
import re

import httpx
from server_testkit import TEST_SETTINGS, connect, frame, hello, stream

from engine.backends import EagerRunner
from server import state as server_state
from server.app import create_app
from server.serve import background_server


class FailingRunner(EagerRunner):
    """The eager runner whose UNet calls number `failing` raise (as a GPU running out of memory would)."""

    def __init__(self, models, failing: set[int]):
        super().__init__(models)
        self.failing = failing
        self.calls = 0

    def unet(self, latents, timesteps, conditioning):
        self.calls += 1
        if self.calls in self.failing:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return super().unet(latents, timesteps, conditioning)


async def test_a_failing_call_costs_its_frame_degrades_health_with_the_reason_and_recovers(server_engine,
                                                                                        monkeypatch):
    runner = FailingRunner(server_engine.models, failing={3})  # priming is call 1, the first frame's call 2
    monkeypatch.setattr(server_state, "ERROR_WINDOW_S", 1.5)
    app = create_app(TEST_SETTINGS, engine=server_engine.with_runner(runner))
    with background_server(app, TEST_SETTINGS) as base_url:
        async with connect(base_url.replace("http://", "ws://") + "/ws") as ws, \
                httpx.AsyncClient(base_url=base_url, timeout=30) as rest:
            await hello(ws)
            assert (await rest.get("/health")).json()["status"] == "ready"
            log = await stream(ws, [frame(index) for index in range(4)], 1)
            errors = log.of_type("error")
            assert [event["seq"] for event in errors] == [1] and errors[0]["code"] == "inference_failed"
            assert "illegal memory access" in errors[0]["message"]
            assert len(log.outputs) == 3  # the session went on
            health = (await rest.get("/health")).json()
            assert health["status"] == "degraded" and "inference error" in health["reason"], health
            assert "illegal memory access" in health["reason"]
            metrics = (await rest.get("/metrics")).text
            assert re.search(r"^streamdiff_inference_errors_total 1\.0$", metrics, re.MULTILINE), metrics
            await asyncio.sleep(1.6)  # no new error within the window: recovered
            health = (await rest.get("/health")).json()
            assert health["status"] == "ready" and "reason" not in health, health
