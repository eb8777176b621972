"""`python -m benchmarks.memory` (also `python -m benchmarks.engine --memory slice,group`): peak memory and
FPS of each memory mode, one fresh subprocess per (size, mode).

A fresh process per configuration so one mode's freed-but-mapped memory never counts against the next.
The child loads the model, builds the engine, records its resident memory (`baseline_mb`: weights,
Python and torch), resets the kernel's high-water mark, runs `warmup` + `frames` frames and reports
the high-water mark (`peak_mb`), the part above the baseline (`activation_mb`), the CUDA allocator's
peak where CUDA runs, and fps (1 / the median measured frame).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from engine.loading import Engine
from engine.stream import StreamEngine

from .clips import tensor_clip
from .report import start_logging, write_json
from .timing import time_stream
from .workload import bench_load, bench_stream

logger = logging.getLogger(__name__)

DEFAULT_SIZES = (512, 1024)
# The children run `python -m benchmarks.memory` from the checkout this module belongs to.
CHECKOUT = Path(__file__).resolve().parents[1]


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (`VmRSS`, `VmHWM`) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset the process's resident high-water mark (Linux clear_refs 5); False when not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(model: str, size: int, mode: str, frames: int, warmup: int,
            t_index_list: tuple[int, ...] | None = None) -> dict:
    """Peak memory and fps of one configuration, in this process (call it in a fresh one).

    With `warmup=0` the measured first frame includes priming the stream (n - 1 extra UNet calls)."""
    torch.manual_seed(0)
    # fp32 on every device (CUDA where present), the precision of the figures in docs/memory.md.
    load = bench_load(model).replace(device="auto", memory=mode)
    config = bench_stream(size)
    if t_index_list:
        config = config.replace(t_index_list=t_index_list)
    engine = StreamEngine(Engine.load(load), config)
    clip = tensor_clip("slow_pan", max(2, warmup + frames), size, size)
    baseline = _status_mb("VmRSS")
    peak_reset = _reset_peak()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(time_stream(engine, clip, frames, warmup))
    peak = _status_mb("VmHWM")
    result = {"peak_mb": round(peak, 1), "fps": round(1.0 / seconds, 5), "baseline_mb": round(baseline, 1),
              "activation_mb": round(peak - baseline, 1), "frame_s": round(seconds, 3),
              "peak_reset": peak_reset}
    if torch.cuda.is_available():
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def measure_in_subprocess(model: str, size: int, mode: str, frames: int, warmup: int, threads: int = 0,
                          t_index_list: tuple[int, ...] | None = None) -> dict:
    """`measure` in a fresh Python process; its JSON is the last line the child prints."""
    command = [sys.executable, "-m", "benchmarks.memory", "--child", "--model", model, "--sizes", str(size),
               "--modes", mode, "--frames", str(frames), "--warmup", str(warmup), "--threads", str(threads)]
    if t_index_list:
        command += ["--t-index-list", ",".join(map(str, t_index_list))]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False, cwd=CHECKOUT)
    if completed.returncode != 0:
        raise RuntimeError(f"memory-mode child {mode}@{size} failed: {completed.stderr[-2000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    logger.info("memory %s at %d: %s (%.0f s)", mode, size, result, time.perf_counter() - started)
    return result


def run(modes: list[str], model: str = "small", sizes: tuple[int, ...] = DEFAULT_SIZES, frames: int = 2,
        warmup: int = 1, jobs: int = 1, threads: int = 0, t_index_list: tuple[int, ...] | None = None) -> dict:
    """`{size: {mode: {"peak_mb", "fps", ...}}}` for `off` and every mode of `modes`, each in its own process.

    `jobs` > 1 runs that many children at once: peak memory is per process and unaffected; fps is then
    measured under the same contention for every mode of a size.
    """
    modes = ["off", *(mode for mode in modes if mode != "off")]
    tasks = [(size, mode) for size in sizes for mode in modes]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {task: pool.submit(measure_in_subprocess, model, task[0], task[1], frames, warmup, threads,
                                     t_index_list) for task in tasks}
    results: dict = {}
    for (size, mode), future in futures.items():
        results.setdefault(str(size), {})[mode] = future.result()
    for row in results.values():
        off = row["off"]
        for mode in modes[1:]:
            row[mode]["peak_vs_off"] = round(row[mode]["peak_mb"] / off["peak_mb"], 3)
            if off["activation_mb"] > 0:
                row[mode]["activation_vs_off"] = round(row[mode]["activation_mb"] / off["activation_mb"], 3)
            row[mode]["fps_vs_off"] = round(row[mode]["fps"] / off["fps"], 3)
    return results


def format_table(results: dict) -> str:
    """One line per size and mode."""
    lines = [f"{'size':>6} {'mode':<6} {'peak_mb':>9} {'activation_mb':>14} {'fps':>10} {'peak/off':>9} {'fps/off':>8}"]
    for size, row in results.items():
        for mode, figures in row.items():
            lines.append(f"{size:>6} {mode:<6} {figures['peak_mb']:>9.1f} {figures['activation_mb']:>14.1f} "
                         f"{figures['fps']:>10.5f} {figures.get('peak_vs_off', 1.0):>9.3f} "
                         f"{figures.get('fps_vs_off', 1.0):>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure every (size, mode) in fresh children and print a table; with `--child`, be one of them."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__)
    parser.add_argument("--modes", default="slice,group", help="comma-separated memory modes (off is always run)")
    parser.add_argument("--model", default="small")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated square sizes")
    parser.add_argument("--frames", type=int, default=2, help="measured frames per configuration (median)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured frames (the first one primes the stream)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations measured at once (fresh processes)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    parser.add_argument("--t-index-list", help="comma-separated stream-batch steps (default: benchmarks.engine's 4)")
    parser.add_argument("--json", type=Path, help="write {'memory': ...} to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = tuple(int(size) for size in args.sizes.split(","))
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    steps = tuple(int(step) for step in args.t_index_list.split(",")) if args.t_index_list else None
    if args.child:
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.model, sizes[0], modes[0], args.frames, args.warmup, steps)))
        return
    start_logging()
    results = {"memory": run(modes, args.model, sizes, args.frames, args.warmup, args.jobs, args.threads,
                                 steps)}
    print(format_table(results["memory"]))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
