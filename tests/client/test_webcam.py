"""`python -m client.webcam` as a user runs it, against a real server."""

import subprocess
import sys
import time

import cv2
import httpx
import pytest

from client.sinks import SinkUnavailable, VirtualCameraSink

pytestmark = pytest.mark.slow


def run_webcam(repo, *args, stdin=None, timeout=90):
    return subprocess.run([sys.executable, "-m", "client.webcam", *args], cwd=repo, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def count_frames(path):
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_synthetic_source_to_a_video_file(server, repo, tmp_path):
    path = tmp_path / "out.mp4"
    completed = run_webcam(repo, "--url", server.ws_url, "--source", "synthetic", "--out", str(path),
                           "--frames", "15", "--fps", "20", "--prompt", "a watercolour city",
                           stdin="a red cat\n")
    assert completed.returncode == 0, completed.stderr
    frames = count_frames(path)
    assert len(frames) == 15
    assert frames[0].shape == (64, 64, 3)  # the server's size
    assert "15 output frames written" in completed.stderr


def test_prompt_lines_from_stdin_reach_the_server(server, repo, tmp_path):
    completed = run_webcam(repo, "--url", server.ws_url, "--source", "synthetic", "--out", str(tmp_path / "o.avi"),
                           "--duration", "4", "--fps", "8", stdin="a red cat\n\nan oil painting\n")
    assert completed.returncode == 0, completed.stderr
    assert "prompt: a red cat" in completed.stderr and "prompt: an oil painting" in completed.stderr
    assert "server error" not in completed.stderr  # the server took both prompt messages
    assert len(count_frames(tmp_path / "o.avi")) > 0


def test_video_file_source_ends_the_stream(server, repo, tmp_path):
    clip = tmp_path / "in.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (120, 90))
    for index in range(9):
        writer.write(cv2.merge([cv2.UMat(90, 120, cv2.CV_8U, index * 25).get()] * 3))
    writer.release()
    out = tmp_path / "out.mp4"
    completed = run_webcam(repo, "--url", server.ws_url, "--source", str(clip), "--out", str(out), "--no-stdin")
    assert completed.returncode == 0, completed.stderr
    assert "the source has ended" in completed.stderr
    assert len(count_frames(out)) == 9


def test_reconnects_when_the_server_restarts(server, repo, tmp_path):
    out = tmp_path / "out.mp4"
    process = subprocess.Popen(
        [sys.executable, "-m", "client.webcam", "--url", server.ws_url, "--source", "synthetic", "--out", str(out),
         "--frames", "30", "--fps", "5", "--no-stdin"], cwd=repo, stderr=subprocess.PIPE, text=True)
    try:
        assert "session" in process.stderr.readline()  # streaming has begun
        time.sleep(1.0)
        server.stop()
        server.start()
        server.wait_ready()
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "reconnecting" in stderr
    assert len(count_frames(out)) == 30


def test_printed_view_url_shows_the_session_for_obs(server, repo, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "client.webcam", "--url", server.ws_url, "--source", "synthetic", "--duration", "6",
         "--fps", "10", "--no-stdin"], cwd=repo, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stderr.readline() for _ in range(3)]
        assert "no local output" in lines[0]
        view_url = lines[2].rsplit(" ", 1)[-1].strip()
        assert view_url.startswith(f"{server.http_url}/view/"), lines
        assert httpx.get(view_url, timeout=5).status_code == 200
        session_id = view_url.rsplit("/", 1)[-1]
        with httpx.stream("GET", f"{server.http_url}/api/sessions/{session_id}/mjpeg", timeout=10) as response:
            assert response.headers["content-type"].startswith("multipart/x-mixed-replace")
            first = next(response.iter_bytes())
        assert b"Content-Type: image/jpeg" in first
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0


def test_missing_camera_is_a_clear_error(repo, unused_port):
    completed = run_webcam(repo, "--url", f"ws://127.0.0.1:{unused_port}/ws", "--source", "97", "--out", "x.mp4")
    assert completed.returncode == 2
    assert "no camera at index 97" in completed.stderr and "--source synthetic" in completed.stderr


def test_server_down_gives_up_after_the_attempts(repo, unused_port, tmp_path):
    completed = run_webcam(repo, "--url", f"ws://127.0.0.1:{unused_port}/ws", "--source", "synthetic",
                           "--out", str(tmp_path / "x.mp4"), "--reconnect-attempts", "2", "--no-stdin")
    assert completed.returncode == 1
    assert "retrying in" in completed.stderr and "cannot stream" in completed.stderr


def test_bad_arguments_are_refused(repo):
    completed = run_webcam(repo, "--source", "synthetic", "--out", "x.mp4", "--frames", "0")
    assert completed.returncode == 2 and "--frames must be positive" in completed.stderr


def test_virtual_camera_output(server, repo, tmp_path):
    try:
        VirtualCameraSink(64, 64, 30.0).close()
        device_reason = None
    except SinkUnavailable as error:
        device_reason = str(error)
    completed = run_webcam(repo, "--url", server.ws_url, "--source", "synthetic", "--vcam", "--frames", "5",
                           "--no-stdin")
    if device_reason is None:
        assert completed.returncode == 0, completed.stderr
        return
    print(f"no virtual camera here, checking the message instead: {device_reason}")
    assert completed.returncode == 2
    assert "modprobe v4l2loopback" in completed.stderr or "OBS" in completed.stderr \
        or "pip install" in completed.stderr
