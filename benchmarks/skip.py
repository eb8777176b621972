"""`python -m benchmarks.skip` (also `python -m benchmarks.engine --skip rehash,adacache`): skip-policy rows.

Per clip category (`benchmarks.clips` kinds: static, slow_pan, fast_motion, hard_cut), the policy-off engine
and one engine per policy run the same frames, called in turn on each frame so that a load change on a
shared machine hits all of them alike. Reported per policy and category: `speedup` (summed step time
off / with the policy, the priming first frame excluded), `psnr` of the outputs against the policy-off
outputs over the whole clip (from the mean squared error over all frames, so frames that happen to come
out identical do not hide the others), `psnr_min` of the worst frame, `ssim` (mean over frames), all
PSNRs capped at `PSNR_CAP` dB for identical outputs (JSON cannot write infinity), and `skip_rate`
(`SkipStats.skip_rate`: the fraction of skippable rows not computed).
"""

from __future__ import annotations

import argparse
import ast
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import SKIP_PARAMS, StreamConfig
from engine.loading import Engine
from engine.stream import StreamEngine

from .clips import CLIP_KINDS, tensor_clip
from .quality import mse, psnr_of_mse, ssim
from .report import start_logging, write_json
from .timing import time_streams
from .workload import bench_load, bench_stream

logger = logging.getLogger(__name__)

PSNR_CAP = 100.0


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs of skip-policy parameters (flat names, `engine.config.SKIP_PARAMS`), values parsed to
    the parameter's type."""
    overrides: dict = {}
    defaults = StreamConfig().flat_params()
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in SKIP_PARAMS:
            raise ValueError(f"--skip-param {pair!r}: not a skip-policy parameter (one of {sorted(SKIP_PARAMS)})")
        current = defaults[key]
        overrides[key] = ast.literal_eval(value) if isinstance(current, tuple) else type(current)(value)
    return overrides


def measure_category(engine: Engine, config: StreamConfig, policies: list[str], frames: list[torch.Tensor],
                     overrides: dict, clock: Callable[[], float] = time.perf_counter) -> dict[str, dict[str, float]]:
    """One clip through the policy-off stream and each policy's stream, frame by frame in turn."""
    engines = {"off": StreamEngine(engine, config)}
    for policy in policies:
        engines[policy] = StreamEngine(engine, config.updated(skip_policy=policy, **overrides))
    errors: dict[str, list[float]] = {policy: [] for policy in policies}
    ssims: dict[str, list[float]] = {policy: [] for policy in policies}

    def compare(index: int, outputs: dict[str, torch.Tensor]) -> None:
        for policy in policies:
            errors[policy].append(mse(outputs[policy], outputs["off"]))
            ssims[policy].append(ssim(outputs[policy], outputs["off"]))

    # The first call primes the stream batch: untimed, but its outputs are compared like the others.
    seconds = {name: sum(times) for name, times in
               time_streams(engines, frames, len(frames) - 1, warmup=1, on_outputs=compare, clock=clock).items()}
    return {policy: {"speedup": round(seconds["off"] / seconds[policy], 3),
                     "psnr": round(min(psnr_of_mse(statistics.fmean(errors[policy])), PSNR_CAP), 2),
                     "psnr_min": round(min(psnr_of_mse(max(errors[policy])), PSNR_CAP), 2),
                     "ssim": round(statistics.fmean(ssims[policy]), 5),
                     "skip_rate": round(engines[policy].skip_policy.stats.skip_rate, 4)}
            for policy in policies}


def run(engine: Engine, config: StreamConfig, policies: list[str], frames: int,
        overrides: dict | None = None, clock: Callable[[], float] = time.perf_counter,
        ) -> dict[str, dict[str, dict[str, float]]]:
    """`{policy: {category: {"speedup", "psnr", "psnr_min", "ssim", "skip_rate"}}}` over every clip category."""
    results: dict[str, dict[str, dict[str, float]]] = {policy: {} for policy in policies}
    for kind in CLIP_KINDS:
        logger.info("skip policies on %s", kind)
        clip = tensor_clip(kind, frames, config.width, config.height)
        for policy, row in measure_category(engine, config, policies, clip, overrides or {}, clock).items():
            results[policy][kind] = row
    return results


def run_policies(model: str, size: int, frames: int, policies: list[str], params: list[str],
                 height: int | None = None) -> dict:
    """The skip-policy rows on the benchmark's config (CPU, fp32; frames `size` wide, `height` (default
    `size`) high); returns the JSON-ready dict."""
    config = bench_stream(size, height)
    engine = Engine.load(bench_load(model))
    overrides = parse_overrides(params)
    return {"model": model, "size": size, "width": config.width, "height": config.height, "frames": frames,
            "t_index_list": list(config.t_index_list), "threads": torch.get_num_threads(), "skip_params": overrides,
            "skip_policies": run(engine, config, policies, frames, overrides)}


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One line per policy and category."""
    lines = [f"  {'policy':<10} {'category':<12} {'speedup':>8} {'psnr':>8} {'psnr_min':>8} {'ssim':>8} "
             f"{'skip_rate':>9}"]
    for policy, categories in results.items():
        for category, row in categories.items():
            lines.append(f"  {policy:<10} {category:<12} {row['speedup']:>7.3f}x {row['psnr']:>8.2f} "
                         f"{row['psnr_min']:>8.2f} {row['ssim']:>8.4f} {row['skip_rate']:>9.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure the skip policies on every clip category, print a table and optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.skip", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", default="rehash,adacache", help="comma-separated skip policies to measure")
    parser.add_argument("--model", default="tiny", help="tiny (default), small (compute-bound) or demo (trained)")
    parser.add_argument("--size", type=int, default=128, help="square frame size in pixels")
    parser.add_argument("--frames", type=int, default=30, help="frames per clip category")
    parser.add_argument("--skip-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a skip-policy parameter, e.g. skip_cut_threshold=0.05")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start_logging()
    results = run_policies(args.model, args.size, args.frames, args.policies.split(","), args.skip_param)
    print(format_table(results["skip_policies"]))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
