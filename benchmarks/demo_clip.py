"""`python -m benchmarks.demo_clip`: stream a synthetic moving clip through the engine and write the result.

No camera and no server needed: a quick end-to-end check of a model and a config on this machine.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

from engine.codec import rgb_to_tensor, tensor_to_rgb
from engine.config import LoadConfig, StreamConfig
from engine.loading import Engine
from engine.stream import StreamEngine

from .clips import CLIP_KINDS, synthetic_clip
from .report import start_logging
from .timing import time_stream

logger = logging.getLogger(__name__)


def write_video(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """Write RGB frames to an MP4 (mp4v) file with OpenCV."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def main(argv: list[str] | None = None) -> None:
    """Stream the clip through the engine and write input | output side by side to `--out`."""
    defaults = StreamConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_clip", description=__doc__)
    parser.add_argument("--model", default=LoadConfig().model)
    parser.add_argument("--prompt", default=defaults.prompt)
    parser.add_argument("--size", type=int, default=defaults.width, help="square frame size")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--clip", choices=CLIP_KINDS, default="slow_pan")
    parser.add_argument("--out", type=Path, default=Path("out/demo.mp4"))
    args = parser.parse_args(argv)
    start_logging()

    config = StreamConfig(prompt=args.prompt, width=args.size, height=args.size)
    engine = StreamEngine(Engine.load(LoadConfig(model=args.model)), config)
    clip = synthetic_clip(args.clip, args.frames, args.size, args.size)
    outputs: list[np.ndarray] = []

    def stream(frame: np.ndarray) -> None:
        outputs.append(tensor_to_rgb(engine(rgb_to_tensor(frame))))

    elapsed = sum(time_stream(stream, clip, len(clip)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_video(args.out, [np.concatenate([a, b], axis=1) for a, b in zip(clip, outputs, strict=True)], fps=15)
    print(f"{len(outputs)} frames ({engine.frames_skipped} skipped by the similarity filter) in {elapsed:.1f} s "
          f"= {len(outputs) / elapsed:.1f} fps; input | output side by side in {args.out}")


if __name__ == "__main__":
    main()
