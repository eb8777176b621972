"""REST routes, metrics, health, static files and the token, on a real server."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families
from server_testkit import TEST_SETTINGS, connect, hello, next_event, random_frame, stream, wait_until

from server.app import create_app
from server.serve import background_server


def metric_values(text: str) -> dict[str, float]:
    return {sample.name + (str(sorted(sample.labels.items())) if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


async def test_health_reports_ready_model_and_sessions(server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        body = (await rest.get("/health")).json()
        assert body["status"] == "ready" and body["model"] == "tiny" and body["sessions"] == 0
        async with connect(server.ws_url) as ws:
            await hello(ws)
            assert (await rest.get("/health")).json()["sessions"] == 1


async def test_sessions_list_and_live_updates(server):
    async with connect(server.ws_url) as ws, httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        session_id = (await hello(ws))["session_id"]
        listed = (await rest.get("/api/sessions")).json()["sessions"]
        assert [item["id"] for item in listed] == [session_id]
        answer = await rest.patch(f"/api/sessions/{session_id}/params",
                                  json={"guidance_scale": 1.5, "similarity_filter": True, "max_skip_frames": 3})
        assert answer.status_code == 200, answer.text
        assert answer.json()["params"]["guidance_scale"] == 1.5
        config = server.state.sessions.get(session_id).handle.config
        assert (config.guidance_scale, config.similarity_filter, config.max_skip_frames) == (1.5, True, 3)
        answer = await rest.post(f"/api/sessions/{session_id}/prompt", json={"prompt": "pencil drawing"})
        assert answer.status_code == 200 and answer.json()["prompt"] == "pencil drawing"
        log = await stream(ws, [random_frame(1)], 2)
        assert len(log.outputs) == 1
        answer = await rest.post(f"/api/sessions/{session_id}/prompt",
                                 json={"prompts": [["pencil drawing", 3], ["neon edges", 1]]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["params"]["prompts"] == [["pencil drawing", 0.75], ["neon edges", 0.25]]
        answer = await rest.patch(f"/api/sessions/{session_id}/params",
                                  json={"prompt_blend": "slerp", "prompt_transition_frames": 4,
                                        "seeds": [[2, 1], [9, 1]], "seed_transition_frames": 2})
        assert answer.status_code == 200, answer.text
        config = server.state.sessions.get(session_id).handle.config
        assert (config.prompt_blend, config.seeds) == ("slerp", ((2, 0.5), (9, 0.5)))
        log = await stream(ws, [random_frame(2), random_frame(3)], 4)
        assert len(log.outputs) == 2
        answer = await rest.post(f"/api/sessions/{session_id}/prompt", json={"prompt": "sepia"})
        assert answer.json()["params"]["prompts"] == [] and answer.json()["prompt"] == "sepia"


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("post", "/api/sessions/nosuch/prompt", {"prompt": "x"}, 404),
    ("patch", "/api/sessions/nosuch/params", {"seed": 1}, 404),
    ("post", "/api/sessions/{id}/prompt", {"prompt": 5}, 422),
    ("post", "/api/sessions/{id}/prompt", {"prompt": "x", "extra": 1}, 422),
    ("post", "/api/sessions/{id}/prompt", {"prompt": "x" * 201}, 422),
    ("patch", "/api/sessions/{id}/params", {}, 422),
    ("patch", "/api/sessions/{id}/params", {"seed": "1"}, 422),
    ("patch", "/api/sessions/{id}/params", {"width": 128}, 422),
    ("patch", "/api/sessions/{id}/params", {"similarity_threshold": 5.0}, 422),
    ("post", "/api/sessions/{id}/prompt", {"prompts": [["a", 1.0]] * 9}, 422),
    ("post", "/api/sessions/{id}/prompt", {"prompts": [["a", 0], ["b", 0]]}, 422),
    ("post", "/api/sessions/{id}/prompt", {"prompts": [["x" * 201, 1.0]]}, 422),
    ("patch", "/api/sessions/{id}/params", {"seeds": [[1, 1], [1, 2]]}, 422),
    ("patch", "/api/sessions/{id}/params", {"prompt_transition_frames": 601}, 422),
])
async def test_rest_rejects_unknown_sessions_and_bad_bodies(server, method, path, body, status):
    async with connect(server.ws_url) as ws, httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        session_id = (await hello(ws))["session_id"]
        before = server.state.sessions.get(session_id).handle.config
        answer = await getattr(rest, method)(path.format(id=session_id), json=body)
        assert answer.status_code == status, answer.text
        assert server.state.sessions.get(session_id).handle.config == before


async def test_metrics_count_frames_sessions_and_latency(server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        before = metric_values((await rest.get("/metrics")).text)
        async with connect(server.ws_url) as ws:
            await hello(ws)
            await stream(ws, [random_frame(seed) for seed in range(3)] + [b"bad"], 2)
            during = metric_values((await rest.get("/metrics")).text)
            await ws.send('{"type": "nope"}')
            await next_event(ws, "error")
        after = metric_values((await rest.get("/metrics")).text)
    assert during["streamdiff_sessions"] == 1
    assert after["streamdiff_frames_in_total"] - before["streamdiff_frames_in_total"] == 4
    assert after["streamdiff_frames_out_total"] - before["streamdiff_frames_out_total"] == 3
    assert after["streamdiff_latency_seconds_count"] - before["streamdiff_latency_seconds_count"] == 3
    assert after["streamdiff_inference_seconds_count"] - before["streamdiff_inference_seconds_count"] == 3
    assert after["streamdiff_frame_errors_total[('code', 'bad_image')]"] - before.get(
        "streamdiff_frame_errors_total[('code', 'bad_image')]", 0) == 1
    assert after["streamdiff_message_errors_total[('code', 'unknown_message_type')]"] >= 1
    for name in ("streamdiff_frames_dropped_total", "streamdiff_frames_skipped_total"):
        assert name in after
    await wait_until(lambda: len(server.state.sessions) == 0)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        assert metric_values((await rest.get("/metrics")).text)["streamdiff_sessions"] == 0


async def test_page_and_static_files_stay_in_their_folder(server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        page = await rest.get("/")
        assert page.status_code == 200 and 'id="camera"' in page.text and "/static/app.js" in page.text
        assert "http" not in page.text.split("<body>")[1].split("</body>")[0].replace("http://localhost", "")
        assert (await rest.get("/static/app.js")).status_code == 200
        for escape in ("/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e/settings.py"):
            answer = await rest.get(escape)
            assert answer.status_code == 404 and "create_app" not in answer.text
        assert (await rest.get("/docs")).status_code == 404  # its assets come from a CDN


async def test_token_is_required_on_websocket_and_rest(start_server):
    with start_server(token="s3cret") as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as rest:
            assert (await rest.get("/health")).status_code == 200
            assert (await rest.get("/api/sessions")).status_code == 401
            assert (await rest.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
            authorized = {"Authorization": "Bearer s3cret"}
            assert (await rest.get("/api/sessions", headers=authorized)).status_code == 200
            assert (await rest.get("/metrics", headers=authorized)).status_code == 200
            for url in (live.ws_url, live.ws_url + "?token=wrong"):
                async with connect(url) as ws:
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await asyncio.wait_for(ws.recv(), 30)
                    assert closed.value.rcvd.code == 1008
            async with connect(live.ws_url + "?token=s3cret") as ws:
                session_id = (await hello(ws))["session_id"]
                assert (await rest.get(f"/view/{session_id}")).status_code == 401
                assert (await rest.get(f"/view/{session_id}?token=s3cret")).status_code == 200
            async with connect(live.ws_url, subprotocols=["streamdiff", "bearer.s3cret"]) as ws:
                assert ws.subprotocol == "streamdiff"
                await hello(ws)
        await wait_until(lambda: len(live.state.sessions) == 0)


async def test_cors_is_off_unless_configured(server, start_server):
    preflight = {"Origin": "http://example.test", "Access-Control-Request-Method": "POST"}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as rest:
        answer = await rest.options("/api/sessions", headers=preflight)
        assert "access-control-allow-origin" not in answer.headers
    with start_server(cors_origins=("http://example.test",)) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as rest:
            answer = await rest.options("/api/sessions", headers=preflight)
            assert answer.headers["access-control-allow-origin"] == "http://example.test"


async def test_failed_model_load_reports_error_and_refuses_streams():

    settings = TEST_SETTINGS.replace(load=TEST_SETTINGS.load.replace(model="/nonexistent/model/folder"))
    app = create_app(settings)
    with background_server(app, settings) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as rest:
            await wait_until(lambda: app.state.server.load_error is not None)
            health = await rest.get("/health")
            assert health.status_code == 503
            assert health.json()["status"] == "error" and "nonexistent" in health.json()["error"]
        async with connect(base_url.replace("http", "ws") + "/ws") as ws:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 30)
            assert closed.value.rcvd.code == 1013 and "failed to load" in closed.value.rcvd.reason


async def test_background_loading_goes_from_loading_to_ready():

    settings = TEST_SETTINGS.replace(load=TEST_SETTINGS.load.replace(vae="tiny"))
    app = create_app(settings)
    seen = []
    with background_server(app, settings) as base_url:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as rest:
            for _ in range(600):
                answer = await rest.get("/health")
                seen.append((answer.json()["status"], answer.status_code))
                if seen[-1][0] != "loading":
                    break
                await asyncio.sleep(0.05)
        async with connect(base_url.replace("http", "ws") + "/ws") as ws:
            await hello(ws)
            log = await stream(ws, [random_frame(1)], 1)
            assert len(log.outputs) == 1
    assert seen[-1] == ("ready", 200)
    assert all(item == ("loading", 503) for item in seen[:-1])
