"""`python -m training.demo_controlnet`: train the `demo` model's canny ControlNet on this CPU.

The demo model (engine/demo_model) stays frozen; a ControlNet made from its UNet learns to add residuals,
computed from the canny edges of the input frame, that bring the engine's few-step output closer to the
style filter (`training.demo_controlnet.train`). The default `--out` is the committed folder,
engine/demo_controlnet. `--eval` compares the demo's output with and without the ControlNet at `--out`
(`training.demo_controlnet.evaluate`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from engine.control import DEMO_CONTROLNET_DIR
from engine.models import DEMO_MODEL_DIR

from .evaluate import main as evaluate
from .train import ControlNetSettings, train


def main(argv: list[str] | None = None) -> None:
    """Train the ControlNet into `--out`, or with `--eval` measure the one there."""
    defaults = ControlNetSettings()
    parser = argparse.ArgumentParser(prog="python -m training.demo_controlnet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_CONTROLNET_DIR,
                        help="ControlNet folder (default: %(default)s)")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR,
                        help="the frozen model folder it is trained for (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--scale", type=float, default=defaults.conditioning_scale,
                        help="conditioning scale of the residuals during training")
    parser.add_argument("--crop", type=int, nargs="+", default=list(defaults.crops),
                        help="crop sides in pixels, one per step in turn (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="crops per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest on a shared machine "
                        "(docs/demo_model.md)")
    parser.add_argument("--eval", action="store_true", help="evaluate the ControlNet at --out instead of training")
    parser.add_argument("--eval-scales", type=float, nargs="+", default=[0.5, 1.0, 1.5],
                        help="--eval's conditioning scales (default: %(default)s)")
    parser.add_argument("--grid", type=Path, default=Path("docs/controlnet_grid.jpg"), help="--eval's image grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.eval:
        evaluate(args.out, args.model, tuple(args.eval_scales), args.grid)
        return
    settings = ControlNetSettings(steps=args.steps, seed=args.seed, learning_rate=args.lr,
                                  conditioning_scale=args.scale, crops=tuple(args.crop), batch=args.batch)
    train(settings, args.out, model=args.model)


if __name__ == "__main__":
    main()
