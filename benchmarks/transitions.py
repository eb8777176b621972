"""`python -m benchmarks.transitions`: how a prompt (or seed) change reaches the output, at once or faded.

A still input, every frame computed (similarity filter off), the stream settled on one prompt; then the prompt
changes, switched at once (0 frames) or faded in over N frames (`prompt_transition_frames`), and the output
settles on the new prompt. Per output frame the change is the mean |Δ| to the previous output in 8-bit levels
(0-255). Each row gives the steady change before the switch (what the still input alone moves), the largest
change after it (the visible jump), the sum of the changes after it (the whole way from one look to the
other, which a fade spreads rather than shortens) and the frames until the output stays within half a level of
where it ends. `--seeds` measures a seed change (`seed_transition_frames`) the same way.
"""

from __future__ import annotations

import argparse
import logging
import platform
from pathlib import Path

import torch

from engine import Engine, LoadConfig, StreamConfig, StreamEngine

from .clips import tensor_clip
from .report import start_logging, write_json

logger = logging.getLogger(__name__)

DEFAULT_FRAMES = (0, 4, 8, 16)
#: The demo model's styles furthest apart (docs/demo_model.md).
FROM_PROMPT, TO_PROMPT = "pencil sketch", "neon edges"
FROM_SEED, TO_SEED = 2, 7
#: Mean |Δ| to the final output (8-bit levels) under which the output counts as settled.
SETTLED_LEVELS = 0.5


def frame_changes(outputs: list[torch.Tensor]) -> list[float]:
    """Mean |Δ| between consecutive outputs (images in [0, 1]) in 8-bit levels."""
    return [float((after - before).abs().mean()) * 255 for before, after in zip(outputs, outputs[1:], strict=False)]


def settled_after(outputs: list[torch.Tensor], levels: float = SETTLED_LEVELS) -> int:
    """How many of `outputs` pass before every later one is within `levels` of the last."""
    final = outputs[-1]
    distances = [float((output - final).abs().mean()) * 255 for output in outputs]
    return next(index for index in range(len(outputs)) if all(d < levels for d in distances[index:]))


@torch.no_grad()
def measure(engine: Engine, config: StreamConfig, change: dict, frames: int, before: int, after: int,
            image: torch.Tensor) -> dict:
    """One row: `before` outputs on `config`, then `change` faded over `frames` frames (0: at once), then
    `frames + after` outputs."""
    stream = StreamEngine(engine, config.updated(prompt_transition_frames=frames, seed_transition_frames=frames))
    settled = [stream(image) for _ in range(before)]
    stream.update_params(**change)
    moved = [stream(image) for _ in range(frames + after)]
    steady = frame_changes(settled)
    changes = frame_changes([settled[-1], *moved])
    return {
        "transition_frames": frames,
        "steady_change": round(max(steady[-3:]), 4),
        "largest_change": round(max(changes), 4),
        "total_change": round(sum(changes), 4),
        "settled_after": settled_after(moved),
        "changes": [round(value, 4) for value in changes],
    }


def run(model: str = "demo", size: int = 256, frames: tuple[int, ...] = DEFAULT_FRAMES, before: int = 8,
        after: int = 8, seeds: bool = False) -> dict:
    """Every row for `model` at `size`×`size`; returns the JSON-ready dict."""
    engine = Engine.load(LoadConfig(model=model, device="cpu", dtype="float32"))
    config = StreamConfig(width=size, height=size, similarity_filter=False, prompt=FROM_PROMPT, seed=FROM_SEED)
    change = {"seed": TO_SEED} if seeds else {"prompt": TO_PROMPT}
    image = tensor_clip("static", 1, size, size)[0]
    rows = []
    for count in frames:
        logger.info("measuring a %s change over %d frames", "seed" if seeds else "prompt", count)
        rows.append(measure(engine, config, change, count, before, after, image))
    return {
        "model": model, "size": size, "t_index_list": list(config.t_index_list), "cfg_type": config.cfg_type,
        "change": {"seed": [FROM_SEED, TO_SEED]} if seeds else {"prompt": [FROM_PROMPT, TO_PROMPT]},
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "rows": rows,
    }


def format_table(results: dict) -> str:
    """A plain-text table of the rows."""
    (kind, (start, end)), = results["change"].items()
    lines = [f"model={results['model']} size={results['size']}x{results['size']} {kind} {start!r} -> {end!r} "
             f"(mean |delta| between consecutive outputs, 8-bit levels)",
             f"  {'frames':>6} {'steady':>8} {'largest':>8} {'total':>8} {'settled after':>14}"]
    for row in results["rows"]:
        lines.append(f"  {row['transition_frames']:>6} {row['steady_change']:>8.2f} {row['largest_change']:>8.2f} "
                     f"{row['total_change']:>8.2f} {row['settled_after']:>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure every row, print the table and optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transitions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo", help="model spec (default demo, whose prompts name styles)")
    parser.add_argument("--size", type=int, default=256, help="square frame size in pixels")
    parser.add_argument("--frames", default=",".join(map(str, DEFAULT_FRAMES)),
                        help="comma-separated transition lengths to measure (0 = switch at once)")
    parser.add_argument("--before", type=int, default=8, help="outputs on the first prompt before the change")
    parser.add_argument("--after", type=int, default=8, help="outputs after the transition's last frame")
    parser.add_argument("--seeds", action="store_true", help="measure a seed change instead of a prompt change")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start_logging()
    frames = tuple(int(part) for part in args.frames.split(",") if part.strip())
    results = run(args.model, args.size, frames, args.before, args.after, args.seeds)
    print(format_table(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
