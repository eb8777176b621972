"""`python -m benchmarks.resolution`: static against dynamic-shape ONNX Runtime graphs at one frame size.

Both engines run the same model, size and clip in one process; the rows alternate in rounds
(static, dynamic, static, dynamic, ...) so that a load change on a shared machine hits both alike.
Each round's figure is the median fps of its frames; the report gives every round, their median and
their spread (max - min over the median), the thread count and the load average before and after.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.config import StreamConfig, parse_resolution_range
from engine.loading import Engine
from engine.stream import StreamEngine

from .clips import tensor_clip
from .report import start_logging, write_json
from .timing import median_fps, time_stream
from .workload import bench_load, bench_stream

logger = logging.getLogger(__name__)

ROWS = ("static", "dynamic")


def _engine(engine: Engine, config: StreamConfig, runner: OnnxRuntimeRunner) -> StreamEngine:
    """A stream on `runner`, its graphs opened (exported if needed) before any frame is timed."""
    return StreamEngine(engine.with_runner(runner), config)


def spread(values: list[float]) -> float:
    """(max - min) / median of `values`: how far apart the rounds of one row are."""
    return (max(values) - min(values)) / statistics.median(values)


def run(model: str = "tiny", size: int = 128, resolution_range: str = "64-256", frames: int = 20, warmup: int = 3,
        rounds: int = 4, exporter: str = "dynamo") -> dict:
    """Interleaved rounds of a static-graph and a dynamic-graph ONNX Runtime engine; the JSON-ready dict."""
    torch.manual_seed(0)
    config = bench_stream(size)
    engine = Engine.load(bench_load(model))
    models = engine.models
    clip = tensor_clip("slow_pan", 60, size, size)
    with tempfile.TemporaryDirectory(prefix="resolution-bench-") as folder:
        runners = {
            "static": OnnxRuntimeRunner(models, config.cfg_type, Path(folder), exporter),
            "dynamic": OnnxRuntimeRunner(models, config.cfg_type, Path(folder), exporter,
                                         resolution_range=parse_resolution_range(resolution_range)),
        }
        engines = {row: _engine(engine, config, runner) for row, runner in runners.items()}
        load_before = os.getloadavg()
        fps: dict[str, list[float]] = {row: [] for row in ROWS}
        for index in range(rounds):
            for row in ROWS:
                fps[row].append(median_fps(time_stream(engines[row], clip, frames, warmup)))
                logger.info("round %d %s: %.2f fps", index + 1, row, fps[row][-1])
        load_after = os.getloadavg()
    ratios = [dynamic / static for static, dynamic in zip(fps["static"], fps["dynamic"], strict=True)]
    return {
        "model": model, "size": size, "resolution_range": resolution_range, "exporter": exporter,
        "frames_per_round": frames, "rounds": rounds, "t_index_list": list(config.t_index_list),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "ort_intra_op_threads": runners["static"].threading.intra_op_num_threads,
                    "load_average_before": [round(value, 2) for value in load_before],
                    "load_average_after": [round(value, 2) for value in load_after]},
        "fps": {row: {"rounds": [round(value, 3) for value in fps[row]],
                      "median": round(statistics.median(fps[row]), 3), "spread": round(spread(fps[row]), 3)}
                for row in ROWS},
        "dynamic_vs_static": {"rounds": [round(value, 3) for value in ratios],
                              "median": round(statistics.median(ratios), 3)},
    }


def format_table(results: dict) -> str:
    """A plain-text table: each row's rounds, median and spread, then the per-round ratio."""
    machine = results["machine"]
    lines = [f"model={results['model']} size={results['size']}x{results['size']} range={results['resolution_range']} "
             f"exporter={results['exporter']} threads={machine['torch_threads']}/{machine['ort_intra_op_threads']} "
             f"(torch/ORT) load={machine['load_average_before'][0]}->{machine['load_average_after'][0]}"]
    for row in ROWS:
        figures = results["fps"][row]
        rounds = " ".join(f"{value:.2f}" for value in figures["rounds"])
        lines.append(f"  {row:<8} median {figures['median']:>8.2f} fps  spread {figures['spread']:>6.1%}  "
                     f"rounds {rounds}")
    ratio = results["dynamic_vs_static"]
    lines.append(f"  dynamic/static median {ratio['median']:.3f}  rounds "
                 + " ".join(f"{value:.3f}" for value in ratio["rounds"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure, print the table and optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.resolution", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (default) or small (compute-bound)")
    parser.add_argument("--size", type=int, default=128, help="square frame size of both engines")
    parser.add_argument("--range", dest="resolution_range", default="64-256",
                        help="the dynamic graphs' resolution range MIN-MAX[:OPT] (must hold --size)")
    parser.add_argument("--frames", type=int, default=20, help="timed frames per round and row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames before each round's frames")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of (static, dynamic)")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start_logging()
    results = run(args.model, args.size, args.resolution_range, args.frames, args.warmup, args.rounds, args.exporter)
    print(format_table(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
