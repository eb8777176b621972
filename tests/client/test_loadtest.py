"""The load tester against a real server on loopback."""

import asyncio
import json
import subprocess
import sys

import httpx
import pytest

from client.loadtest import LoadTestConfig, run_load_test, run_ramp

pytestmark = pytest.mark.slow


async def test_load_test_counts_agree_with_the_server(server):
    before = server.counters()
    summary, reports = await run_load_test(LoadTestConfig(url=server.ws_url, streams=2, duration_s=3.0))
    after = server.counters()

    assert summary.errors == 0 and summary.dropped == 0
    assert summary.received > 0
    for report in reports:
        assert report.received > 0
        assert report.in_window <= report.received
        assert len(report.latencies_s) == report.received and min(report.latencies_s) > 0
        assert report.received == report.sent  # every frame is answered: nothing dropped, the drain took the rest
    assert summary.total_fps == pytest.approx(sum(summary.per_stream_fps))
    assert all(fps > 0 for fps in summary.per_stream_fps)
    assert 0 < summary.latency_ms["p50"] <= summary.latency_ms["p95"] <= summary.latency_ms["p99"]
    assert len({session for report in reports for session in report.session_ids}) == 2

    frames_in = after["streamdiff_frames_in_total"] - before.get("streamdiff_frames_in_total", 0)
    frames_out = after["streamdiff_frames_out_total"] - before.get("streamdiff_frames_out_total", 0)
    assert (frames_in, frames_out) == (summary.sent, summary.received)


async def test_fps_cap_is_kept(server):
    summary, reports = await run_load_test(LoadTestConfig(url=server.ws_url, streams=1, duration_s=2.0, fps=4.0))
    assert summary.errors == 0
    assert 1 <= reports[0].sent <= 9  # 4 per second for 2 s, plus the one sent at the start


async def test_ramp_stops_at_the_first_count_below_target(server):
    ramp = await run_ramp(LoadTestConfig(url=server.ws_url, streams=1, duration_s=1.0), target_fps=1e6,
                          max_streams=3)
    assert (ramp.capacity, ramp.below_target_at, len(ramp.steps)) == (0, 1, 1)


def test_cli_writes_the_json_keys(server, tmp_path, repo):
    path = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, "-m", "client.loadtest", "--url", server.ws_url, "--streams", "2", "--duration", "2",
         "--size", "96x80", "--json", str(path)], cwd=repo, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert "total" in completed.stdout
    result = json.loads(path.read_text())
    assert {"streams", "duration_s", "total_fps", "per_stream_fps", "latency_ms", "errors", "dropped"} <= set(result)
    assert result["streams"] == 2 and result["duration_s"] == 2 and len(result["per_stream_fps"]) == 2
    assert set(result["latency_ms"]) == {"p50", "p95", "p99"} and result["latency_ms"]["p50"] > 0
    assert result["total_fps"] == pytest.approx(sum(result["per_stream_fps"]))


def test_cli_reports_a_server_that_is_not_there(tmp_path, repo, unused_port):
    completed = subprocess.run(
        [sys.executable, "-m", "client.loadtest", "--url", f"ws://127.0.0.1:{unused_port}/ws", "--duration", "1",
         "--json", str(tmp_path / "r.json")], cwd=repo, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert "could not connect" in completed.stderr
    assert json.loads((tmp_path / "r.json").read_text())["errors"] == 1


async def test_streams_over_the_server_limit_count_as_errors(server, caplog):
    for _ in range(40):  # earlier tests' sessions may still be closing on the server
        health = httpx.get(f"{server.http_url}/health", timeout=5).json()
        if health["sessions"] == 0:
            break
        await asyncio.sleep(0.25)
    limit = health["max_sessions"]
    summary, reports = await run_load_test(LoadTestConfig(url=server.ws_url, streams=limit + 1, duration_s=1.0))
    refused = [report for report in reports if not report.session_ids]
    assert len(refused) == 1 and refused[0].errors == 1 and refused[0].sent == 0
    assert summary.errors == 1 and summary.per_stream_fps.count(0.0) >= 1
    assert "server is busy (close 1013" in caplog.text
