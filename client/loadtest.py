"""`python -m client.loadtest`: N concurrent synthetic streams against one server; FPS and latency percentiles.

Each stream is one WebSocket session that sends a moving synthetic pattern within the server's in-flight limit
(optionally capped at `--fps`) for `--duration` seconds, then drains its outstanding outputs. Latency is send →
its output frame (outputs come in order). Only the URL given is contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2

from .connection import ConnectionFailed, StreamConnection
from .frames import encode_jpeg
from .pacing import next_due
from .patterns import moving_pattern
from .protocol import parse_size
from .stats import RampResult, RunSummary, StreamReport, meets_target, ramp_result, summarize

logger = logging.getLogger(__name__)

MAX_STREAMS = 256
MAX_DURATION_S = 3600.0
FRAME_CYCLE = 60


@dataclass(frozen=True)
class LoadTestConfig:
    """One run.

    Args:
        url: the server's WebSocket URL (`ws://127.0.0.1:8000/ws`).
        streams: concurrent sessions.
        duration_s: length of the measuring window.
        fps: per-stream send cap; `None` sends as fast as the in-flight limit allows.
        size: frame size to send (`None`: the size in the server's hello).
        token: the server's bearer token, if it has one.
        connect_timeout_s: time to open each session.
        drain_timeout_s: time to wait for outstanding outputs after the window.
    """

    url: str
    streams: int = 1
    duration_s: float = 10.0
    fps: float | None = None
    size: tuple[int, int] | None = None
    token: str | None = None
    connect_timeout_s: float = 10.0
    drain_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not 1 <= self.streams <= MAX_STREAMS:
            raise ValueError(f"`streams` must be within [1, {MAX_STREAMS}], got {self.streams}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"`duration_s` must be within (0, {MAX_DURATION_S}], got {self.duration_s}")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"`fps` must be positive, got {self.fps}")


def synthetic_frames(width: int, height: int, count: int = FRAME_CYCLE) -> list[bytes]:
    """A cycle of JPEG-encoded moving-pattern frames, encoded once so the load tester spends little CPU."""
    return [encode_jpeg(cv2.cvtColor(moving_pattern(index, width, height), cv2.COLOR_RGB2BGR))
            for index in range(count)]


async def _send_frames(connection: StreamConnection, frames: list[bytes], offset: int, report: StreamReport,
                       end: float, fps: float | None) -> None:
    period = 1.0 / fps if fps else 0.0
    due = time.perf_counter()
    index = 0
    while (now := time.perf_counter()) < end:
        if due > now:
            await asyncio.sleep(min(due, end) - now)
            continue
        sent_at = await connection.send_frame(frames[(offset + index) % len(frames)], timeout=end - now)
        if sent_at is None:
            break
        report.sent += 1
        index += 1
        due = next_due(due, period, time.perf_counter())


async def _receive_outputs(connection: StreamConnection, report: StreamReport, end: float,
                           sending: asyncio.Task, drain_deadline: float) -> None:
    while (now := time.perf_counter()) < drain_deadline:
        if sending.done() and connection.outstanding == 0:
            return
        try:
            output = await connection.next_output(timeout=min(0.25, drain_deadline - now))
        except TimeoutError:
            continue
        report.received += 1
        report.in_window += output.received_at <= end
        report.latencies_s.append(output.latency_s)


async def run_stream(connection: StreamConnection, frames: list[bytes], report: StreamReport, start: float,
                     config: LoadTestConfig) -> None:
    """Drive one open session through the window `[start, start + duration)`, then drain; fills `report`."""
    end = start + config.duration_s
    report.session_ids.append(connection.hello.session_id)
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    sending = asyncio.create_task(_send_frames(connection, frames, report.index * 7, report, end, config.fps))
    receiving = asyncio.create_task(
        _receive_outputs(connection, report, end, sending, end + config.drain_timeout_s))
    try:
        await asyncio.gather(sending, receiving)
    except ConnectionFailed as failure:
        logger.warning("stream %d: %s", report.index, failure)
        report.errors += 1
    finally:
        for task in (sending, receiving):
            task.cancel()
        await asyncio.gather(sending, receiving, return_exceptions=True)
        report.dropped = connection.dropped
        report.errors += len(connection.errors)
        await connection.close()


async def _open(config: LoadTestConfig, report: StreamReport) -> StreamConnection | None:
    try:
        return await StreamConnection.open(config.url, config.token, open_timeout=config.connect_timeout_s)
    except ConnectionFailed as failure:
        logger.warning("stream %d could not connect: %s", report.index, failure)
        report.errors += 1
        return None


async def run_load_test(config: LoadTestConfig) -> tuple[RunSummary, list[StreamReport]]:
    """Open all sessions, run them over one common window, and summarise."""
    reports = [StreamReport(index) for index in range(config.streams)]
    connections = await asyncio.gather(*(_open(config, report) for report in reports))
    opened = [(connection, report) for connection, report in zip(connections, reports, strict=True) if connection]
    if opened:
        hello = opened[0][0].hello
        width, height = config.size or (hello.width, hello.height)
        frames = await asyncio.to_thread(synthetic_frames, width, height)
        start = time.perf_counter() + 0.05
        await asyncio.gather(*(run_stream(connection, frames, report, start, config) for connection, report in opened))
    return summarize(reports, config.duration_s), reports


async def run_ramp(config: LoadTestConfig, target_fps: float, max_streams: int, step: int = 1) -> RampResult:
    """Run with `config.streams`, then `step` more each time, until the mean per-stream FPS falls below
    `target_fps` or `max_streams` is passed."""
    if target_fps <= 0 or step < 1 or not config.streams <= max_streams <= MAX_STREAMS:
        raise ValueError(f"need `target_fps` > 0, `step` >= 1 and `streams` <= `max_streams` <= {MAX_STREAMS}")
    steps: list[RunSummary] = []
    for streams in range(config.streams, max_streams + 1, step):
        summary, reports = await run_load_test(LoadTestConfig(**{**config.__dict__, "streams": streams}))
        print_summary(summary, reports)
        steps.append(summary)
        if not meets_target(summary, target_fps):
            break
    return ramp_result(steps, target_fps)


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def format_table(summary: RunSummary, reports: list[StreamReport]) -> str:
    """Per-stream rows and a total row: sent, received, dropped, errors, FPS, latency percentiles (ms)."""
    header = f"{'stream':>6} {'sent':>6} {'recv':>6} {'drop':>5} {'err':>4} {'fps':>7} {'p50':>7} {'p95':>7} {'p99':>7}"
    rows = [header]
    for report, fps in zip(reports, summary.per_stream_fps, strict=True):
        single = summarize([report], summary.duration_s)
        latency = single.latency_ms
        rows.append(f"{report.index:>6} {report.sent:>6} {report.received:>6} {report.dropped:>5} {report.errors:>4} "
                    f"{fps:>7.2f} {_ms(latency['p50']):>7} {_ms(latency['p95']):>7} {_ms(latency['p99']):>7}")
    latency = summary.latency_ms
    rows.append(f"{'total':>6} {summary.sent:>6} {summary.received:>6} {summary.dropped:>5} {summary.errors:>4} "
                f"{summary.total_fps:>7.2f} {_ms(latency['p50']):>7} {_ms(latency['p95']):>7} {_ms(latency['p99']):>7}")
    return "\n".join(rows)


def print_summary(summary: RunSummary, reports: list[StreamReport]) -> None:
    print(f"{summary.streams} stream(s), {summary.duration_s:g} s window:")
    print(format_table(summary, reports), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client.loadtest", description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000/ws", help="the server's WebSocket URL")
    parser.add_argument("--streams", type=int, default=1, help="concurrent sessions (the first count when ramping)")
    parser.add_argument("--duration", type=float, default=10.0, help="measuring window in seconds (per ramp step)")
    parser.add_argument("--fps", type=float, default=None, help="per-stream send cap (default: as fast as allowed)")
    parser.add_argument("--size", type=parse_size, default=None, help="frame size WxH (default: the server's)")
    parser.add_argument("--token", default=None, help="bearer token, sent as ?token=")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path")
    parser.add_argument("--ramp", action="store_true", help="add streams until per-stream FPS drops below target")
    parser.add_argument("--target-fps", type=float, default=None, help="the per-stream FPS a ramp must keep")
    parser.add_argument("--max-streams", type=int, default=16, help="the ramp's upper bound on streams")
    parser.add_argument("--ramp-step", type=int, default=1, help="streams added per ramp step")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.ramp and args.target_fps is None:
        parser.error("--ramp needs --target-fps")
    try:
        config = LoadTestConfig(url=args.url, streams=args.streams, duration_s=args.duration, fps=args.fps,
                                size=args.size, token=args.token)
    except ValueError as error:
        parser.error(str(error))
    if args.ramp:
        try:
            ramp = asyncio.run(run_ramp(config, args.target_fps, args.max_streams, args.ramp_step))
        except ValueError as error:
            parser.error(str(error))
        last = ramp.steps[-1]
        below = "not reached" if ramp.below_target_at is None else f"at {ramp.below_target_at} streams"
        print(f"ramp: {ramp.capacity} stream(s) keep >= {ramp.target_fps:g} FPS each; below target {below}")
        result = {**last.as_json(), "ramp": {"target_fps": ramp.target_fps, "capacity": ramp.capacity,
                                             "below_target_at": ramp.below_target_at,
                                             "steps": [step.as_json() for step in ramp.steps]}}
        failed = last.errors > 0 and last.received == 0
    else:
        summary, reports = asyncio.run(run_load_test(config))
        print_summary(summary, reports)
        result = summary.as_json()
        failed = summary.received == 0
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if failed:
        print("no output frames were received", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
