"""The ControlNet rows of `python -m benchmarks.engine --controlnet SPEC`: its cost and the cost of reusing its
residuals, against the same engine without it (`engine_fps` here), in interleaved rounds on one clip.

- `controlnet_fps`: the ControlNet computed on every frame (canny control images, made on the input stage).
- `controlnet_reuse_fps`: residuals reused (`controlnet_reuse_interval`, `controlnet_reuse_threshold`).
- `controlnet_reuse_psnr_db`: PSNR of the reusing stream's outputs against the every-frame stream's, frame by frame.
- `control_preprocess_ms`: the median time of the control source on one frame (it runs beside the VAE encoder).
"""

from __future__ import annotations

import logging
import statistics
import time

import torch

from engine.config import LoadConfig, StreamConfig
from engine.loading import Engine
from engine.stream import StreamEngine

from .quality import mse, psnr_of_mse
from .timing import median_fps, time_streams

logger = logging.getLogger(__name__)

#: The reuse setting the benchmark measures unless told otherwise: residuals at most every 4 frames.
DEFAULT_REUSE_INTERVAL = 4


def run(load: LoadConfig, config: StreamConfig, clip: list[torch.Tensor], frames: int, warmup: int, spec: str,
        reuse_interval: int = DEFAULT_REUSE_INTERVAL, reuse_threshold: float | None = None) -> dict:
    """The rows and their ratios to the engine without a ControlNet (`engine_fps` of the same rounds)."""
    plain = Engine.load(load)
    controlled = Engine.load(load.replace(controlnet=spec))
    reuse = config.replace(controlnet_reuse_interval=reuse_interval,
                           **({} if reuse_threshold is None else {"controlnet_reuse_threshold": reuse_threshold}))
    streams = {"engine_fps": StreamEngine(plain, config),
               "controlnet_fps": StreamEngine(controlled, config),
               "controlnet_reuse_fps": StreamEngine(controlled, reuse)}
    errors: list[float] = []

    def compare(index: int, outputs: dict) -> None:
        if index >= warmup:
            errors.append(mse(outputs["controlnet_reuse_fps"], outputs["controlnet_fps"]))

    logger.info("measuring the ControlNet %r: every frame and reused (interval %d), interleaved", spec, reuse_interval)
    seconds = time_streams(streams, clip, frames, warmup, on_outputs=compare)
    results = {name: round(median_fps(values), 4) for name, values in seconds.items()}
    source = controlled.control_source
    preprocess = []
    for frame in clip[:frames]:
        started = time.perf_counter()
        source(frame.unsqueeze(0), config)
        preprocess.append(time.perf_counter() - started)
    results.update({
        "controlnet": spec,
        "controlnet_reuse_interval": reuse_interval,
        "controlnet_reuse_threshold": reuse.controlnet_reuse_threshold,
        "controlnet_reuse_psnr_db": round(psnr_of_mse(statistics.mean(errors)), 2),
        "control_preprocess_ms": round(1000 * statistics.median(preprocess), 3),
        "ratios": {"controlnet_vs_engine": round(results["controlnet_fps"] / results["engine_fps"], 3),
                   "controlnet_reuse_vs_engine": round(results["controlnet_reuse_fps"] / results["engine_fps"], 3)},
    })
    return results


def format_table(results: dict) -> str:
    """The rows as plain text."""
    lines = [f"ControlNet {results['controlnet']!r} (reuse: every {results['controlnet_reuse_interval']} frames at "
             f"most, threshold {results['controlnet_reuse_threshold']})"]
    for key in ("engine_fps", "controlnet_fps", "controlnet_reuse_fps"):
        lines.append(f"  {key:<26} {results[key]:>10.3f}")
    lines.append(f"  {'controlnet_reuse_psnr_db':<26} {results['controlnet_reuse_psnr_db']:>10.2f}")
    lines.append(f"  {'control_preprocess_ms':<26} {results['control_preprocess_ms']:>10.3f}")
    for key, value in results["ratios"].items():
        lines.append(f"  {key:<26} {value:>10.3f}x")
    return "\n".join(lines)
