"""`python -m training.demo_model`: train the `demo` model, a small prompt-following stylizer, on this CPU.

Two stages, both on augmented crops of scikit-image's photographs (`training.demo_model.data`):

1. the tiny VAE learns to reconstruct photos and their stylised versions;
2. with the VAE frozen, the UNet and text encoder learn to turn a frame into the style its prompt names
   (`training.demo_model.styles`), through exactly the few-step denoising the engine runs.

The default `--out` is the engine's committed checkpoint, engine/demo_model. `python -m training.demo_model
--eval` measures the committed (or `--out`) checkpoint instead (`training.demo_model.evaluate`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from engine.models import DEMO_MODEL_DIR

from .evaluate import main as evaluate
from .train import TrainSettings, train


def main(argv: list[str] | None = None) -> None:
    """Train the `demo` model into `--out`, or with `--eval` measure the checkpoint there."""
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="python -m training.demo_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_MODEL_DIR, help="checkpoint folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.unet_steps, help="stylizer steps (VAE steps scale "
                        f"with it: {defaults.vae_steps} for the default {defaults.unet_steps})")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: scaled with --steps)")
    parser.add_argument("--resume", type=Path, default=None, help="continue training from this saved folder")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--crop", type=int, default=defaults.unet_crop, help="stylizer crop side in pixels")
    parser.add_argument("--batch", type=int, default=defaults.unet_batch, help="stylizer crops per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is fastest on a shared machine "
                        "(OpenMP threads spin against other processes; docs/demo_model.md), 2 on an idle one")
    parser.add_argument("--eval", action="store_true", help="evaluate the checkpoint at --out instead of training")
    parser.add_argument("--grid", type=Path, default=Path("docs/demo_grid.png"), help="--eval's image grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.eval:
        evaluate(args.out, args.grid)
        return
    vae_steps = args.vae_steps if args.vae_steps is not None else \
        max(1, round(defaults.vae_steps * args.steps / defaults.unet_steps))
    settings = TrainSettings(vae_steps=vae_steps, unet_steps=args.steps, unet_crop=args.crop,
                             unet_batch=args.batch, vae_crop=min(defaults.vae_crop, args.crop), seed=args.seed)
    train(settings, args.out, resume=args.resume)


if __name__ == "__main__":
    main()
