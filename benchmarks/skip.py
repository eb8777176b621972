"""Skip-policy rows of `python -m benchmarks.engine --skip rehash,adacache`.

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

import ast
import logging
import statistics
import time

import torch

from engine.codec import rgb_to_tensor
from engine.config import EngineConfig
from engine.models import ModelBundle
from engine.stream import StreamEngine

from .clips import CLIP_KINDS, synthetic_clip
from .quality import mse, psnr_of_mse, ssim

logger = logging.getLogger(__name__)

PSNR_CAP = 100.0


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs of `EngineConfig` skip fields, values parsed to the field's type."""
    overrides: dict = {}
    defaults = EngineConfig()
    for pair in pairs:
        key, _, value = pair.partition("=")
        if not hasattr(defaults, key) or not (key.startswith(("skip_", "rehash_", "adacache_"))):
            raise ValueError(f"--skip-param {pair!r}: not a skip-policy field of EngineConfig")
        current = getattr(defaults, key)
        overrides[key] = ast.literal_eval(value) if isinstance(current, tuple) else type(current)(value)
    return overrides


def measure_category(models: ModelBundle, config: EngineConfig, policies: list[str], frames: list[torch.Tensor],
                     overrides: dict) -> dict[str, dict[str, float]]:
    """One clip through the policy-off engine and each policy's engine, frame by frame in turn."""
    engines = {"off": StreamEngine(models, config)}
    for policy in policies:
        engines[policy] = StreamEngine(models, config.replace(skip_policy=policy, **overrides))
    seconds = {name: 0.0 for name in engines}
    errors: dict[str, list[float]] = {policy: [] for policy in policies}
    ssims: dict[str, list[float]] = {policy: [] for policy in policies}
    for index, frame in enumerate(frames):
        outputs = {}
        for name, engine in engines.items():
            started = time.perf_counter()
            outputs[name] = engine(frame)
            if index:  # the first call primes the stream batch
                seconds[name] += time.perf_counter() - started
        for policy in policies:
            errors[policy].append(mse(outputs[policy], outputs["off"]))
            ssims[policy].append(ssim(outputs[policy], outputs["off"]))
    return {policy: {"speedup": round(seconds["off"] / seconds[policy], 3),
                     "psnr": round(min(psnr_of_mse(statistics.fmean(errors[policy])), PSNR_CAP), 2),
                     "psnr_min": round(min(psnr_of_mse(max(errors[policy])), PSNR_CAP), 2),
                     "ssim": round(statistics.fmean(ssims[policy]), 5),
                     "skip_rate": round(engines[policy].skip_policy.stats.skip_rate, 4)}
            for policy in policies}


def run(models: ModelBundle, config: EngineConfig, policies: list[str], frames: int,
        overrides: dict | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """`{policy: {category: {"speedup", "psnr", "psnr_min", "ssim", "skip_rate"}}}` over every clip category."""
    results: dict[str, dict[str, dict[str, float]]] = {policy: {} for policy in policies}
    for kind in CLIP_KINDS:
        logger.info("skip policies on %s", kind)
        clip = [rgb_to_tensor(frame) for frame in synthetic_clip(kind, frames, config.width, config.height)]
        for policy, row in measure_category(models, config, policies, clip, overrides or {}).items():
            results[policy][kind] = row
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """One line per policy and category."""
    lines = [f"  {'policy':<10} {'category':<12} {'speedup':>8} {'psnr':>8} {'psnr_min':>8} {'ssim':>8} "
             f"{'skip_rate':>9}"]
    for policy, categories in results.items():
        for category, row in categories.items():
            lines.append(f"  {policy:<10} {category:<12} {row['speedup']:>7.3f}x {row['psnr']:>8.2f} "
                         f"{row['psnr_min']:>8.2f} {row['ssim']:>8.4f} {row['skip_rate']:>9.3f}")
    return "\n".join(lines)
