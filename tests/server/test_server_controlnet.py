"""A server with a ControlNet: the hello names it, its per-session parameters are hot over WebSocket and REST,
and bad values get a clear error without ending the session."""

from __future__ import annotations

import json

import httpx
import numpy as np
from server_testkit import connect, encode, hello, next_event, random_frame, stream, wait_until


async def test_controlnet_parameters_are_hot_per_session(controlnet_server):
    server = controlnet_server
    async with connect(server.ws_url) as ws, httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        greeting = await hello(ws)
        assert greeting["controlnet"] == str(server.settings.load.controlnet)
        session = server.state.sessions.get(greeting["session_id"])
        await ws.send(json.dumps({"type": "params", "controlnet_scale": 0.4, "canny_low_threshold": 20,
                                  "canny_high_threshold": 60}))
        await wait_until(lambda: session.handle.config.controlnet_scale == 0.4)
        assert session.handle.config.canny_low_threshold == 20
        answer = await rest.patch(f"/api/sessions/{greeting['session_id']}/params",
                                  json={"show_control": True, "controlnet_reuse_interval": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["params"]["show_control"] is True
        log = await stream(ws, [random_frame(seed) for seed in range(3)], 2)
        assert len(log.outputs) == 3 and not log.of_type("error")
        await ws.send(json.dumps({"type": "params", "controlnet_scale": 99}))
        error = await next_event(ws, "error")
        assert error["code"] == "invalid_params" and "controlnet_scale" in error["message"]
        answer = await rest.patch(f"/api/sessions/{greeting['session_id']}/params",
                                  json={"canny_low_threshold": 300, "canny_high_threshold": 100})
        assert answer.status_code == 422 and "canny_low_threshold" in answer.text
        log = await stream(ws, [random_frame(seed) for seed in range(3, 5)], 2)
        assert len(log.outputs) == 2 and session.handle.config.controlnet_scale == 0.4


async def test_a_server_without_controlnet_says_so(server):
    async with connect(server.ws_url) as ws:
        assert (await hello(ws))["controlnet"] is None


async def test_a_failing_control_image_costs_one_frame_of_one_session(controlnet_server, monkeypatch):
    """The control source runs on the shared input threads: one frame it cannot handle gets an error answer, and
    that session and every other one go on."""
    from engine.control.sources import CannySource

    real = CannySource.__call__
    white = encode(np.full((64, 64, 3), 255, dtype=np.uint8), "PNG")

    def control(self, frames, config):
        if float(frames.min()) > 0.99:
            raise RuntimeError("a control preprocessor bug")
        return real(self, frames, config)

    monkeypatch.setattr(CannySource, "__call__", control)
    server = controlnet_server
    async with connect(server.ws_url) as victim, connect(server.ws_url) as bystander:
        await hello(victim)
        await hello(bystander)
        await victim.send(white)
        error = await next_event(victim, "error")
        assert error["seq"] == 0 and "control preprocessor bug" in error["message"]
        for ws in (victim, bystander):
            log = await stream(ws, [random_frame(seed) for seed in range(2)], 2)
            assert len(log.outputs) == 2 and not log.of_type("error"), log.events
    assert server.state.runtime.status().failure is None
