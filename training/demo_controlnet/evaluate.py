"""Evaluate the demo ControlNet (`python -m training.demo_controlnet --eval`).

The demo model's evaluation (`training.demo_model.evaluate.score_styles`: held-out pans, PSNR/SSIM against
the style filters per style, plus detail) run on the demo's output without the ControlNet and with it at a
few conditioning scales. The engine does not serve ControlNets yet, so the with-ControlNet output comes
from `reference_outputs`, an offline reference of the engine's computation: per frame, the engine's
sequential denoising step (its schedule, fixed noise, RCFG guidance and VAE calls) with the ControlNet's
residuals added to each UNet call. Without a ControlNet it gives the engine's own output (the table shows
both, so the reference is checked on every run).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from diffusers import ControlNetModel

from engine.backends import EagerRunner
from engine.codec import rgb_to_tensor, tensor_to_rgb
from engine.config import LoadConfig, StreamConfig
from engine.loading import load_bundle
from engine.models import ModelBundle
from engine.noise import seeded_noise
from engine.prompt import encode_prompt
from engine.schedule import slot_schedule
from training.demo_model.data import HELD_OUT_IMAGES, load_images, moving_crops
from training.demo_model.evaluate import StyleScore, label, score_styles, stream_outputs
from training.demo_model.styles import STYLES, stylize
from training.demo_model.train import unrolled_x0

from .train import ControlNetSettings, control_images, controlnet_inputs

logger = logging.getLogger(__name__)

__all__ = ["compare", "main", "reference_outputs", "write_grid"]


@torch.no_grad()
def reference_outputs(models: ModelBundle, frames: list[np.ndarray], prompt: str,
                      controlnet: ControlNetModel | None = None, conditioning_scale: float = 1.0,
                      low_threshold: int = 100, high_threshold: int = 200, edges: bool = True) -> list[np.ndarray]:
    """The engine's output for each of `frames` (RGB uint8, square) under `prompt`, with a ControlNet's residuals.

    Mirrors `StreamEngine` at its defaults (what `training.demo_model.evaluate.stream_outputs` runs): the
    frame's VAE latent scaled by the VAE's factor, the default `t_index_list` of the 50-step LCM schedule,
    the fixed per-slot noise drawn from `StreamConfig().seed`, RCFG `self` guidance at 1.2 with that noise
    as stock, the LCM x̂0 and re-noising between slots; the stream batch equals this sequential computation.
    With `controlnet`, every UNet call gets the residuals of the frame's canny image
    (`engine.control.canny`) scaled by `conditioning_scale`; with `edges` False, of a black control image
    instead (an ablation: what the ControlNet adds without the edges). `result[i]` is the output of `frames[i]`.
    """
    size = frames[0].shape[0]
    config = StreamConfig(width=size, height=size, prompt=prompt, similarity_filter=False)
    runner = EagerRunner(models)
    schedule = slot_schedule(models.scheduler, config.num_inference_steps, config.t_index_list, 1,
                             torch.device("cpu"), torch.float32)
    # `StreamEngine._new_noise`: one row per slot, drawn from the stream's seed (one seed of weight 1 is
    # `engine.noise.seeded_noise` bit for bit).
    shape = (models.unet.config.in_channels, size // models.vae_scale_factor, size // models.vae_scale_factor)
    fixed = seeded_noise(config.seed, (config.denoising_steps, *shape))
    noises = [fixed[k:k + 1] for k in range(config.denoising_steps)]
    outputs = []
    for frame in frames:  # one frame per call, as the engine encodes, denoises and decodes them
        latents = runner.encode(rgb_to_tensor(frame)[None] * 2 - 1)
        text = encode_prompt(models.tokenizer, models.text_encoder, prompt)
        residuals = None
        if controlnet is not None:
            control = control_images([frame], low_threshold, high_threshold)
            if not edges:
                control = torch.zeros_like(control)
            residuals = partial(controlnet_inputs, controlnet, text=text, control=control,
                                conditioning_scale=conditioning_scale)
        x0 = unrolled_x0(models.unet, latents, text, schedule, config, noises, residuals)[-1]
        outputs.append(tensor_to_rgb((runner.decode(x0)[0] / 2 + 0.5).clamp(0, 1)))
    return outputs


def compare(models: ModelBundle, controlnet: ControlNetModel, images: dict[str, np.ndarray], size: int,
            scales: tuple[float, ...]) -> dict[str, list[StyleScore]]:
    """Scores per variant: the engine without the ControlNet, the reference without it, with it per scale, and
    with it at scale 1 on black control images (no edges)."""
    variants = {"engine, no ControlNet": partial(stream_outputs, models),
                "reference, no ControlNet": partial(reference_outputs, models)}
    for scale in scales:
        variants[f"ControlNet scale {scale:g}"] = partial(reference_outputs, models, controlnet=controlnet,
                                                          conditioning_scale=scale)
    variants["scale 1, black control"] = partial(reference_outputs, models, controlnet=controlnet, edges=False)
    return {name: score_styles(models, images, size, render=render) for name, render in variants.items()}


def write_grid(models: ModelBundle, controlnet: ControlNetModel, images: dict[str, np.ndarray], path: Path,
               size: int = 256, scale: float = 1.0) -> None:
    """Per held-out image three rows: the filters, the demo's outputs, and the demo's outputs with the ControlNet.

    At the engine's default size, where the ControlNet changes most; JPEG (quality 90) keeps the file small.
    """
    rows = []
    for name, image in images.items():
        frame = moving_crops(image, 1, size)[0]
        edges = tensor_to_rgb(control_images([frame])[0])
        filters, plain, controlled = [label(frame, f"{name} input")], [label(edges, "canny")], [label(frame, "")]
        for style in STYLES:
            filters.append(label(stylize(frame, style), f"filter: {style}"[:26]))
            plain.append(label(reference_outputs(models, [frame], style)[0], f"demo: {style}"[:26]))
            controlled.append(label(reference_outputs(models, [frame], style, controlnet, scale)[0],
                                     f"+ControlNet {scale:g}: {style}"[:26]))
        rows += [np.concatenate(filters, axis=1), np.concatenate(plain, axis=1), np.concatenate(controlled, axis=1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])


def _cell(score: StyleScore) -> str:
    return f"{score.psnr:6.2f} {score.ssim:5.3f} {score.detail:4.2f}"


def main(folder: Path, model: Path, scales: tuple[float, ...] = (0.5, 1.0, 1.5), grid: Path | None = None,
         sizes: tuple[int, ...] = (128, 256)) -> None:
    """Print the comparison for the ControlNet folder `folder` on the model folder `model`; write the grid."""
    models = load_bundle(LoadConfig(model=str(model), device="cpu", dtype="float32", backend="eager"))
    models.name = "demo"
    controlnet = ControlNetModel.from_pretrained(folder).eval().requires_grad_(False)
    images = load_images(HELD_OUT_IMAGES)
    defaults = StreamConfig()
    print(f"held-out images: {', '.join(images)}; engine defaults (t_index_list {defaults.t_index_list}, "
          f"cfg {defaults.cfg_type} {defaults.guidance_scale}, seed {defaults.seed}), 4-frame pans; canny "
          f"{ControlNetSettings().low_threshold}/{ControlNetSettings().high_threshold} of the input frame")
    print("each cell: PSNR dB, SSIM against the filter, detail (output gradient / filter gradient)")
    for size in sizes:
        results = compare(models, controlnet, images, size, scales)
        names = list(results)
        print(f"\n{size}x{size}:  {'style':<20} " + " | ".join(f"{name:<24}" for name in names))
        for index, style in enumerate(STYLES):
            print(f"{'':10}{style:<20} " + " | ".join(f"{_cell(results[name][index]):<24}" for name in names))
        means = []
        for name in names:
            scores = results[name]
            means.append(f"{np.mean([s.psnr for s in scores]):6.2f} {np.mean([s.ssim for s in scores]):5.3f} "
                         f"{np.mean([s.detail for s in scores]):4.2f}")
        print(f"{'':10}{'mean':<20} " + " | ".join(f"{cell:<24}" for cell in means))
    if grid is not None:
        write_grid(models, controlnet, images, grid)
        print(f"\ngrid written to {grid}")
