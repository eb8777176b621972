"""`python -m benchmarks.server`: delivered FPS over loopback WebSocket vs the engine in-process, same config.

Three measurements on the same frames (a synthetic clip, JPEG-encoded once up front):
  engine    `StreamEngine.step` on decoded tensors in a loop (the model's own speed), in a worker thread
            like the runtime's inference thread;
  runtime   the threaded `StreamRuntime` in-process: JPEG decode → inference → JPEG encode;
  websocket one client over `ws://127.0.0.1` to a real uvicorn server, `max_in_flight` frames in flight.
The similarity filter is off so every frame is computed. Runs alternate and the medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import websockets

from engine import Engine, LoadConfig, StreamConfig, StreamEngine
from engine.codec import decode_image, encode_jpeg, rgb_to_tensor
from engine.runtime import StreamRuntime
from server.app import create_app
from server.serve import background_server
from server.settings import ServerSettings

from .clips import CLIP_KINDS, synthetic_clip
from .timing import time_stream


@dataclass
class BenchResult:
    """Median frames per second of each path, and the WebSocket/engine ratio."""

    model: str
    width: int
    height: int
    t_index_list: list[int]
    frames: int
    repeats: int
    max_in_flight: int
    engine_fps: float
    runtime_fps: float
    websocket_fps: float

    @property
    def ratio(self) -> float:
        return self.websocket_fps / self.engine_fps


def in_worker_thread(function: Callable[..., float], *args) -> float:
    """Run `function` in a fresh thread, as the runtime's inference thread runs the model.

    On a loaded machine torch's OpenMP team on the main thread can run the same steps several times
    slower than in a worker thread (figures in docs/server.md), so the engine is timed the way the
    server runs it.
    """
    results: list[float] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(function(*args))
        except BaseException as error:  # re-raised in the caller
            errors.append(error)

    thread = threading.Thread(target=target, name="bench-engine")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


def engine_fps(engine: Engine, config: StreamConfig, frames: list[bytes], warmup: int) -> float:
    """Frames per second of `StreamEngine.step` on the decoded frames, timed in a worker thread."""
    return in_worker_thread(_engine_fps, engine, config, frames, warmup)


def _engine_fps(engine: Engine, config: StreamConfig, frames: list[bytes], warmup: int) -> float:
    stream = StreamEngine(engine, config)
    images = [rgb_to_tensor(decode_image(data, config.width, config.height)) for data in frames]
    # Warm up on the first `warmup` images, then time every image, as the other two paths do.
    return len(images) / sum(time_stream(stream.step, images[:warmup] + images, len(images), warmup))


def runtime_fps(engine: Engine, config: StreamConfig, frames: list[bytes], warmup: int,
                max_in_flight: int) -> float:
    """Frames per second of the threaded `StreamRuntime` in-process, `max_in_flight` frames in flight."""
    with StreamRuntime(engine, config) as runtime:
        handle = runtime.open_stream(max_in_flight=max_in_flight)
        for data in frames[:warmup]:
            handle.put(data)
            handle.get(60)
        started = time.perf_counter()
        sent = answered = 0
        while answered < len(frames):
            while sent < len(frames) and sent - answered < max_in_flight:
                handle.put(frames[sent])
                sent += 1
            if handle.get(60) is None:
                raise RuntimeError("the runtime stopped answering")
            answered += 1
        return len(frames) / (time.perf_counter() - started)


async def _websocket_stream(url: str, frames: list[bytes], warmup: int, max_in_flight: int) -> float:
    async with websockets.connect(url, max_size=None) as ws:
        json.loads(await ws.recv())  # hello

        async def run(batch: list[bytes]) -> None:
            sent = answered = 0
            while answered < len(batch):
                while sent < len(batch) and sent - answered < max_in_flight:
                    await ws.send(batch[sent])
                    sent += 1
                if isinstance(await asyncio.wait_for(ws.recv(), 60), bytes):
                    answered += 1

        await run(frames[:warmup])
        started = time.perf_counter()
        await run(frames)
        return len(frames) / (time.perf_counter() - started)


def websocket_fps(engine: Engine, config: StreamConfig, frames: list[bytes], warmup: int,
                  max_in_flight: int) -> float:
    """Frames per second of one WebSocket client of a real server on loopback, `max_in_flight` in flight."""
    settings = ServerSettings(load=engine.config, stream=config, port=0, max_in_flight=max_in_flight,
                              log_level="warning")
    app = create_app(settings, engine=engine)
    with background_server(app, settings) as base_url:
        url = base_url.replace("http://", "ws://") + "/ws"
        return asyncio.run(_websocket_stream(url, frames, warmup, max_in_flight))


def run_bench(model: str = "tiny", width: int = 256, height: int = 256, t_index_list: tuple[int, ...] | None = None,
              frames: int = 60, warmup: int = 5, repeats: int = 3, max_in_flight: int = 2,
              clip: str = "slow_pan") -> BenchResult:
    """Measure the three paths `repeats` times, alternating, on `frames` frames of `clip`."""
    changes = {} if t_index_list is None else {"t_index_list": tuple(t_index_list)}
    config = StreamConfig(width=width, height=height, similarity_filter=False, **changes)
    # Eager, as every figure this benchmark recorded (docs/server.md): it compares paths, not backends.
    engine = Engine.load(LoadConfig(model=model, backend="eager"))
    clip_frames = [encode_jpeg(rgb) for rgb in synthetic_clip(clip, frames + warmup, width, height)]
    warm, timed = clip_frames[:warmup], clip_frames[warmup:]
    results: dict[str, list[float]] = {"engine": [], "runtime": [], "websocket": []}
    for _ in range(repeats):
        results["engine"].append(engine_fps(engine, config, warm + timed, warmup))
        results["runtime"].append(runtime_fps(engine, config, warm + timed, warmup, max_in_flight))
        results["websocket"].append(websocket_fps(engine, config, warm + timed, warmup, max_in_flight))
    return BenchResult(model=model, width=width, height=height, t_index_list=list(config.t_index_list),
                       frames=frames, repeats=repeats, max_in_flight=max_in_flight,
                       engine_fps=statistics.median(results["engine"]),
                       runtime_fps=statistics.median(results["runtime"]),
                       websocket_fps=statistics.median(results["websocket"]))


def main(argv: list[str] | None = None) -> None:
    """Measure the three paths and print a table, or with `--json` one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--t-index-list", type=lambda text: tuple(int(t) for t in text.split(",")), default=None)
    parser.add_argument("--frames", type=int, default=60, help="timed frames per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--clip", choices=CLIP_KINDS, default="slow_pan")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    args = parser.parse_args(argv)
    result = run_bench(args.model, args.width, args.height, args.t_index_list, args.frames, args.warmup,
                       args.repeats, args.max_in_flight, args.clip)
    if args.json:
        print(json.dumps({**asdict(result), "ratio": round(result.ratio, 3)}))
        return
    print(f"model {result.model} {result.width}x{result.height} t_index_list {result.t_index_list} "
          f"({result.frames} frames x {result.repeats} runs, max_in_flight {result.max_in_flight}, "
          f"torch threads {torch.get_num_threads()})")
    print(f"  engine in-process  {result.engine_fps:7.2f} fps")
    print(f"  runtime in-process {result.runtime_fps:7.2f} fps")
    print(f"  websocket loopback {result.websocket_fps:7.2f} fps")
    print(f"  websocket / engine {result.ratio:7.3f}")


if __name__ == "__main__":
    main()
