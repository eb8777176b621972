"""`python -m benchmarks.batching`: aggregate FPS of N flooding streams in one `StreamRuntime`,
alternating `max_batch=1` and `max_batch=N` so a noisy machine affects both alike (no network, no client)."""

from __future__ import annotations

import argparse
import time

import torch

from engine.codec import encode_jpeg
from engine.config import LoadConfig, RuntimeOptions, StreamConfig
from engine.loading import Engine
from engine.runtime import StreamRuntime

from .clips import synthetic_clip


def measure(engine: Engine, config: StreamConfig, streams: int, max_batch: int, duration: float,
            batch_wait_s: float = 0.0) -> tuple[float, float]:
    """(aggregate output FPS, mean frames per network pass) of `streams` streams kept full for `duration` s."""
    frames = [encode_jpeg(frame) for frame in synthetic_clip("fast_motion", 16, config.width, config.height)]
    options = RuntimeOptions(max_batch=max_batch, batch_wait_s=batch_wait_s)
    with StreamRuntime(engine, config, options) as runtime:
        handles = [runtime.open_stream(max_in_flight=2, prompt=f"stream {index}") for index in range(streams)]
        for handle in handles:  # prime every buffer before the window opens
            handle.put(frames[0])
            handle.get(timeout=120)
        before = runtime.status()
        outputs, sent, deadline = 0, 0, time.monotonic() + duration
        started = time.monotonic()
        while time.monotonic() < deadline:
            for handle in handles:
                while handle.get_nowait() is not None:
                    outputs += 1
                if handle.in_flight < handle.max_in_flight:
                    handle.put(frames[sent % len(frames)])
                    sent += 1
            time.sleep(0.001)
        elapsed = time.monotonic() - started
        after = runtime.status()
        batch = (after.frames_inferred - before.frames_inferred) / max(1, after.batches - before.batches)
    return outputs / elapsed, batch


def main() -> None:
    """Alternate `max_batch=1` and `max_batch=N` runtimes for `--rounds` rounds and print each round."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batching", description=__doc__)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="the batched runtime's gather window (StreamRuntime batch_wait_s, in ms)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = StreamConfig(width=args.size, height=args.size, similarity_filter=False)
    engine = Engine.load(LoadConfig(model=args.model, backend="eager"))  # only eager batches sessions
    for round_index in range(args.rounds):
        alone, _ = measure(engine, config, args.streams, 1, args.duration)
        batched, batch = measure(engine, config, args.streams, args.streams, args.duration,
                                 args.batch_wait_ms / 1000)
        print(f"round {round_index + 1}: max_batch=1 {alone:.2f} fps, max_batch={args.streams} {batched:.2f} fps "
              f"(mean batch {batch:.2f}), speed-up {batched / alone:.2f}x", flush=True)


if __name__ == "__main__":
    main()
