"""Streaming over a real WebSocket: count, order, prompt updates mid-stream, isolation, stats, MJPEG."""

from __future__ import annotations

import asyncio
import json

import httpx
from server_testkit import (
    StreamLog,
    connect,
    decode,
    hello,
    max_difference,
    next_event,
    random_frame,
    reference_outputs,
    stream,
    wait_until,
)

from wire import blend_message

# JPEG round-off only: a swapped or foreign frame differs by far more.
SAME_FRAME_TOLERANCE = 3
DISTINCT = 4 * SAME_FRAME_TOLERANCE


async def test_round_trip_answers_every_frame_once_in_order(server, server_engine):
    frames = [random_frame(seed) for seed in range(6)]
    async with connect(server.ws_url) as ws:
        greeting = await hello(ws)
        assert (greeting["width"], greeting["height"]) == (64, 64)
        assert greeting["max_in_flight"] == server.settings.max_in_flight
        session = server.state.sessions.get(greeting["session_id"])
        assert session is not None
        log = await stream(ws, frames, greeting["max_in_flight"])
    assert len(log.outputs) == len(frames)
    assert not log.of_type("error")
    # Every frame is named: the k-th frame sent is seq k, answered by a `frame` event before its JPEG.
    assert [event["seq"] for event in log.frames] == list(range(len(frames)))
    assert all(event["latency_ms"] > 0 and event["skipped"] is False for event in log.frames)
    expected = reference_outputs(server_engine, server.settings.stream, frames)
    for index, (jpeg, reference) in enumerate(zip(log.outputs, expected, strict=True)):
        assert max_difference(decode(jpeg), reference) <= SAME_FRAME_TOLERANCE, f"output {index} out of place"
    # The check has teeth: neighbouring outputs are far apart.
    assert min(max_difference(expected[i], expected[i + 1]) for i in range(1, len(frames) - 1)) > DISTINCT
    assert session.handle.stats.frames_out == len(frames)
    assert session.handle.stats.dropped == 0


async def test_rest_prompt_update_mid_stream_changes_the_output(server, server_engine):
    still = [random_frame(7)] * 4
    async with connect(server.ws_url) as ws:
        session_id = (await hello(ws))["session_id"]
        before = await stream(ws, still, 2)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
            answer = await rest.post(f"/api/sessions/{session_id}/prompt",
                                     json={"prompt": "a neon city at night", "negative_prompt": "dull"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["prompt"] == "a neon city at night"
        after = await stream(ws, still, 2)
    # With a still input the stream settles to one output per prompt.
    assert max_difference(decode(before.outputs[-1]), decode(before.outputs[-2])) <= SAME_FRAME_TOLERANCE
    assert max_difference(decode(after.outputs[-1]), decode(before.outputs[-1])) > DISTINCT
    changed = server.settings.stream.replace(prompt="a neon city at night", negative_prompt="dull")
    settled = reference_outputs(server_engine, changed, still)[-1]
    assert max_difference(decode(after.outputs[-1]), settled) <= SAME_FRAME_TOLERANCE


async def test_ws_prompt_and_params_messages_apply_to_the_session(server):
    async with connect(server.ws_url) as ws:
        session = server.state.sessions.get((await hello(ws))["session_id"])
        await ws.send('{"type": "prompt", "prompt": "ink sketch", "negative_prompt": "colour"}')
        await ws.send('{"type": "params", "guidance_scale": 2, "seed": 5, "t_index_list": [20, 40]}')
        await wait_until(lambda: session.handle.config.seed == 5)
        config = session.handle.config
        assert (config.prompt, config.negative_prompt) == ("ink sketch", "colour")
        assert (config.guidance_scale, config.t_index_list) == (2.0, (20, 40))
        log = await stream(ws, [random_frame(1), random_frame(2)], 2)
        assert len(log.outputs) == 2


async def test_ws_prompt_blend_message_and_an_engine_refusal(server):
    async with connect(server.ws_url) as ws:
        session = server.state.sessions.get((await hello(ws))["session_id"])
        await ws.send(blend_message([("ink sketch", 0.25), ("neon", 0.75)]))
        await wait_until(lambda: session.handle.config.prompts == (("ink sketch", 0.25), ("neon", 0.75)))
        # Nine prompts pass the protocol's list bound but not the engine's: an error event, the blend stays.
        await ws.send(blend_message([(f"p{index}", 1.0) for index in range(9)]))
        error = await next_event(ws, "error")
        assert error["code"] == "invalid_params" and "`prompts` may hold at most 8" in error["message"]
        assert session.handle.config.prompts == (("ink sketch", 0.25), ("neon", 0.75))
        log = await stream(ws, [random_frame(1)], 2)
        assert len(log.outputs) == 1


async def test_two_sessions_are_isolated(server, server_engine):
    frames_a = [random_frame(100 + i) for i in range(4)]
    frames_b = [random_frame(200 + i) for i in range(4)]
    async with connect(server.ws_url) as ws_a, connect(server.ws_url) as ws_b:
        id_a, id_b = (await hello(ws_a))["session_id"], (await hello(ws_b))["session_id"]
        assert id_a != id_b
        await ws_b.send('{"type": "prompt", "prompt": "session b only"}')
        session_b = server.state.sessions.get(id_b)
        await wait_until(lambda: session_b.handle.config.prompt == "session b only")
        log_a, log_b = await asyncio.gather(stream(ws_a, frames_a, 2), stream(ws_b, frames_b, 2))
    # The server closes its side after the client's close frame: wait for it rather than race it.
    await wait_until(lambda: server.state.sessions.get(id_a) is None)
    expected_a = reference_outputs(server_engine, server.settings.stream, frames_a)
    expected_b = reference_outputs(server_engine, server.settings.stream.replace(prompt="session b only"), frames_b)
    for got, want in zip(log_a.outputs, expected_a, strict=True):
        assert max_difference(decode(got), want) <= SAME_FRAME_TOLERANCE
    for got, want in zip(log_b.outputs, expected_b, strict=True):
        assert max_difference(decode(got), want) <= SAME_FRAME_TOLERANCE


async def test_stats_events_report_the_session(server):
    frames = [random_frame(seed) for seed in range(4)]
    async with connect(server.ws_url) as ws:
        await hello(ws)
        log = await stream(ws, frames, 2)
        stats = await next_event(ws, "stats", log)
    assert stats["frames_in"] == stats["frames_out"] == len(frames)
    assert stats["dropped"] == 0 and stats["skipped"] == 0 and stats["errors"] == 0
    assert stats["fps"] > 0 and stats["latency_ms"] > 0 and stats["inference_ms"] > 0


async def test_mjpeg_and_viewer_show_the_session_output(server):
    async with connect(server.ws_url) as ws, httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        session_id = (await hello(ws))["session_id"]
        page = await rest.get(f"/view/{session_id}")
        assert page.status_code == 200 and "/mjpeg" in page.text
        assert (await rest.get("/view/nosuchsession")).status_code == 404
        log = StreamLog()
        async with rest.stream("GET", f"/api/sessions/{session_id}/mjpeg") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("multipart/x-mixed-replace; boundary=frame")
            await stream(ws, [random_frame(1), random_frame(2)], 2, log)
            received = b""
            async for chunk in response.aiter_bytes():
                received += chunk
                if received.count(b"\xff\xd9") >= 1:
                    break
    header, _, body = received.partition(b"\r\n\r\n")
    assert header.startswith(b"--frame\r\nContent-Type: image/jpeg")
    length = int(header.split(b"Content-Length: ")[1])
    assert decode(body[:length]).shape == (64, 64, 3)
    assert body[:length] in log.outputs


async def test_a_flood_answers_every_frame_exactly_once(server):
    """Latest wins: frames sent faster than the model gets `dropped` answers, the rest `frame` answers; each seq
    is answered once, frame answers in seq order."""
    frames = [random_frame(seed) for seed in range(12)]
    async with connect(server.ws_url) as ws:
        await hello(ws)
        for data in frames:  # no flow control: all at once
            await ws.send(data)
        log = StreamLog()
        announced = None
        while len(log.answered_seqs()) < len(frames):
            message = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(message, bytes):
                log.outputs.append(message)
                log.frames.append(announced)
                continue
            event = json.loads(message)
            if event["type"] == "frame":
                announced = event
            else:
                log.events.append(event)
    assert log.answered_seqs() == list(range(len(frames)))
    frame_seqs = [event["seq"] for event in log.frames]
    assert frame_seqs == sorted(frame_seqs) and len(log.outputs) == len(frame_seqs)
    assert log.of_type("dropped") and not log.of_type("error")


async def test_temporal_mechanism_is_a_session_parameter_over_websocket_and_rest(server):
    async with connect(server.ws_url) as ws, httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        session_id = (await hello(ws))["session_id"]
        session = server.state.sessions.get(session_id)
        await ws.send(json.dumps({"type": "params", "temporal": "bank", "temporal_bank_size": 3}))
        await wait_until(lambda: session.handle.config.temporal == "bank")
        assert session.handle.config.temporal_settings.bank_size == 3
        answer = await rest.patch(f"/api/sessions/{session_id}/params",
                                  json={"temporal": "flow", "temporal_strength": 0.5})
        assert answer.status_code == 200, answer.text
        assert answer.json()["params"]["temporal"] == "flow"
        assert answer.json()["params"]["temporal_strength"] == 0.5
        log = await stream(ws, [random_frame(seed) for seed in range(3)], 2)
        assert len(log.outputs) == 3 and not log.of_type("error")
        await ws.send(json.dumps({"type": "params", "temporal": "sometimes"}))
        assert (await next_event(ws, "error"))["code"] == "invalid_params"
