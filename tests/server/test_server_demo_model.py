"""`make serve`'s model: the committed `demo` stylizer through a real server, its style switched mid-stream."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
from server_testkit import TEST_SETTINGS, connect, decode, encode, hello, stream

from benchmarks.clips import synthetic_clip
from engine import Engine, RuntimeOptions
from server.app import create_app
from server.serve import background_server

MAKEFILE = Path(__file__).resolve().parents[2] / "Makefile"


def test_make_serve_serves_the_demo_model():
    text = MAKEFILE.read_text()
    assert re.search(r"^MODEL \?= demo$", text, re.MULTILINE)
    assert "-m server --model $(MODEL)" in text


async def test_demo_style_follows_a_prompt_change_mid_stream():
    load = TEST_SETTINGS.load.replace(model="demo", vae="tiny")
    stream_config = TEST_SETTINGS.stream.replace(width=128, height=128, prompt="thermal camera")
    settings = TEST_SETTINGS.replace(load=load, stream=stream_config, runtime=RuntimeOptions(max_pixels=128 * 128))
    app = create_app(settings, engine=Engine.load(load))
    frame = encode(synthetic_clip("static", 1, 128, 128, seed=3)[0])
    with background_server(app, settings) as base_url:
        async with connect(base_url.replace("http://", "ws://") + "/ws") as ws:
            session_id = (await hello(ws))["session_id"]
            thermal = decode((await stream(ws, [frame] * 3, 1)).outputs[-1])
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as rest:
                answer = await rest.post(f"/api/sessions/{session_id}/prompt", json={"prompt": "pencil sketch"})
            assert answer.status_code == 200, answer.text
            sketch = decode((await stream(ws, [frame] * 3, 1)).outputs[-1])
    assert thermal.shape == sketch.shape == (128, 128, 3)
    # Measured 137/255 apart; a sketch is bright and gray (mean 232, channel spread 1.7), the thermal
    # image dark and coloured (97, 41).
    assert np.abs(thermal - sketch).mean() > 80
    assert sketch.mean() > thermal.mean() + 80
    assert np.abs(sketch - sketch.mean(axis=2, keepdims=True)).mean() < np.abs(
        thermal - thermal.mean(axis=2, keepdims=True)).mean()
