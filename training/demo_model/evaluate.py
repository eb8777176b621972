"""Evaluate the `demo` model through the engine (`python -m training.demo_model --eval`).

For each held-out image and style, a slow pan over the image streams through `StreamEngine` at the
engine's defaults, and each output is compared (PSNR, SSIM) with the classical filter of the frame it
came from, and its detail (image gradients) with the filter's. Also: how far apart the outputs of
different prompts are for the same frame, and a before/after grid image.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

from benchmarks.quality import mse, psnr_of_mse, ssim
from engine.backends import EagerRunner
from engine.codec import rgb_to_tensor, tensor_to_rgb
from engine.config import LoadConfig, StreamConfig
from engine.loading import Engine, load_bundle
from engine.models import ModelBundle
from engine.stream import StreamEngine

from .data import HELD_OUT_IMAGES, load_images, moving_crops
from .styles import STYLES, stylize

logger = logging.getLogger(__name__)

__all__ = ["Render", "StyleScore", "detail", "label", "prompt_separation", "score_styles", "stream_outputs",
           "vae_roundtrip", "write_grid"]

#: How a model turns a pan of frames (RGB uint8) under a prompt into outputs aligned with the frames.
Render = Callable[[list[np.ndarray], str], list[np.ndarray]]


@dataclass(frozen=True)
class StyleScore:
    """Mean PSNR (dB) and SSIM of the engine's output against the filter; PSNR of two references; detail.

    `input_psnr` is the unchanged frame against the filter (the do-nothing baseline); `vae_psnr` is the
    filter's output passed through the VAE alone (encode, decode), the ceiling any UNet can reach.
    `detail` is the outputs' mean gradient magnitude over the filter outputs' (`detail`): 1 has as much
    edge and texture as the filter, below 1 is softer, above 1 busier (which is not better: PSNR/SSIM say
    whether the detail is the right one).
    """

    style: str
    size: int
    psnr: float
    ssim: float
    input_psnr: float
    vae_psnr: float
    detail: float


def _chw(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return psnr_of_mse(mse(_chw(a), _chw(b)), data_range=255)


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    # The uniform window: the one the published figures (docs/demo_model.md) were measured with.
    return ssim(_chw(a), _chw(b), data_range=255, window="uniform")


def detail(rgb: np.ndarray) -> float:
    """Mean gradient magnitude of an RGB uint8 image (3×3 Sobel per channel, 0–255 units): how sharp it is."""
    image = rgb.astype(np.float32)
    return float(cv2.magnitude(cv2.Sobel(image, cv2.CV_32F, 1, 0), cv2.Sobel(image, cv2.CV_32F, 0, 1)).mean())


def vae_roundtrip(models: ModelBundle, rgb: np.ndarray) -> np.ndarray:
    """`rgb` (uint8) encoded and decoded by the model's VAE through the engine's runner, nothing else."""
    runner = EagerRunner(models)
    with torch.inference_mode():
        latents = runner.encode(rgb_to_tensor(rgb)[None].to(models.unet.dtype) * 2 - 1)
        return tensor_to_rgb((runner.decode(latents)[0] + 1) / 2)


def stream_outputs(models: ModelBundle, frames: list[np.ndarray], prompt: str) -> list[np.ndarray]:
    """The engine's outputs for `frames` (RGB uint8) under `prompt`, aligned with the frame each came from.

    The stream batch delays its output by `denoising_steps - 1` frames after the first; the outputs are
    shifted back so `result[i]` is the output of `frames[i]`. The similarity filter is off, so every frame runs.
    """
    size = frames[0].shape[0]
    config = StreamConfig(width=size, height=size, prompt=prompt, similarity_filter=False)
    engine = StreamEngine(Engine.prepare(models, LoadConfig(model=models.name, device="cpu", backend="eager")), config)
    lag = config.denoising_steps - 1
    outputs = [tensor_to_rgb(engine(rgb_to_tensor(frame))) for frame in [*frames, *[frames[-1]] * lag]]
    return [outputs[0], *outputs[1 + lag:]][: len(frames)] if lag else outputs


def score_styles(models: ModelBundle, images: dict[str, np.ndarray], size: int, frames: int = 4,
                 render: Render | None = None) -> list[StyleScore]:
    """Per style, mean PSNR/SSIM over the pans of every image in `images` at `size`² pixels.

    `render` produces the outputs scored; by default the engine's (`stream_outputs`). The VAE ceiling is
    always the bundle's VAE.
    """
    render = render if render is not None else partial(stream_outputs, models)
    scores = []
    pans = {name: moving_crops(image, frames, size) for name, image in images.items()}
    for style in STYLES:
        psnrs, ssims, input_psnrs, vae_psnrs, details, target_details = [], [], [], [], [], []
        for pan in pans.values():
            for frame, output in zip(pan, render(pan, style), strict=True):
                target = stylize(frame, style)
                details.append(detail(output))
                target_details.append(detail(target))
                psnrs.append(_psnr(output, target))
                ssims.append(_ssim(output, target))
                input_psnrs.append(_psnr(frame, target))
                vae_psnrs.append(_psnr(vae_roundtrip(models, target), target))
        scores.append(StyleScore(style, size, float(np.mean(psnrs)), float(np.mean(ssims)),
                                 float(np.mean(input_psnrs)), float(np.mean(vae_psnrs)),
                                 # A ratio of means: per-frame ratios blow up on nearly flat filter outputs.
                                 float(np.mean(details) / max(np.mean(target_details), 1e-6))))
    return scores


def prompt_separation(models: ModelBundle, frame: np.ndarray, prompts: list[str]) -> dict[tuple[str, str], float]:
    """Mean absolute difference (0–255 scale) between the outputs of every pair of prompts for one frame."""
    outputs = {prompt: stream_outputs(models, [frame], prompt)[0].astype(np.float32) for prompt in prompts}
    return {(a, b): float(np.abs(outputs[a] - outputs[b]).mean()) for a, b in itertools.combinations(prompts, 2)}


def label(tile: np.ndarray, text: str) -> np.ndarray:
    """`tile` (RGB uint8) with a white strip above it carrying `text`."""
    strip = np.full((18, tile.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(strip, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([strip, tile])


def write_grid(models: ModelBundle, images: dict[str, np.ndarray], path: Path, size: int = 128) -> None:
    """Per held-out image two rows: the classical filters, and the `demo` model's streamed outputs."""
    rows = []
    for name, image in images.items():
        frame = moving_crops(image, 1, size)[0]
        filters = [label(frame, f"{name} input")]
        model = [label(frame, "engine input")]
        for style in STYLES:
            filters.append(label(stylize(frame, style), f"filter: {style}"[:26]))
            model.append(label(stream_outputs(models, [frame], style)[0], f"demo: {style}"[:26]))
        rows += [np.concatenate(filters, axis=1), np.concatenate(model, axis=1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR))


def main(folder: Path, grid: Path, sizes: tuple[int, ...] = (128, 256)) -> None:
    """Print the evaluation of the model folder `folder` and write the grid image to `grid`."""
    models = load_bundle(LoadConfig(model=str(folder), device="cpu", dtype="float32"))
    models.name = "demo"
    images = load_images(HELD_OUT_IMAGES)
    defaults = StreamConfig()
    print(f"held-out images: {', '.join(images)}; engine defaults (t_index_list {defaults.t_index_list}, "
          f"cfg {defaults.cfg_type} {defaults.guidance_scale}), 4-frame pans")
    for size in sizes:
        print(f"\n{size}x{size}: {'style':<22} {'PSNR dB':>8} {'SSIM':>6} {'input PSNR':>11} {'VAE PSNR':>9}")
        scores = score_styles(models, images, size)
        for score in scores:
            print(f"{'':9}{score.style:<22} {score.psnr:8.2f} {score.ssim:6.3f} {score.input_psnr:11.2f} "
                  f"{score.vae_psnr:9.2f}")
        print(f"{'':9}{'mean':<22} {np.mean([s.psnr for s in scores]):8.2f} {np.mean([s.ssim for s in scores]):6.3f}")
    frame = moving_crops(images[HELD_OUT_IMAGES[0]], 1, 128)[0]
    separation = prompt_separation(models, frame, list(STYLES))
    worst = min(separation, key=separation.get)
    print(f"\nprompt separation on one 128x128 frame (mean |difference|, 0-255): min {separation[worst]:.1f} "
          f"({worst[0]!r} vs {worst[1]!r}), median {np.median(list(separation.values())):.1f}")
    unknown = prompt_separation(models, frame, ["photo", "xyzzy qwerty"])[("photo", "xyzzy qwerty")]
    print(f"unknown prompt 'xyzzy qwerty' vs 'photo' (the fallback; small is right): {unknown:.1f}")
    write_grid(models, images, grid)
    print(f"\ngrid written to {grid}")
