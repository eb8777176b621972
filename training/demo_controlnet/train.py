"""Training the `demo` model's canny ControlNet.

A diffusers `ControlNetModel` made from the demo UNet (`ControlNetModel.from_unet`: a copy of its down and
mid blocks, zero-initialised output convolutions, a small conditioning embedding for the control image)
learns, with the demo's UNet, text encoder and VAE frozen, to add residuals to the UNet so that the
engine's few-step output comes closer to the style filter of the frame. The control image is the canny
edge map of the input frame (`engine.control.canny`): the structure the small stylizer blurs. The loss is
the stylizer's (`training.demo_model.train`): each slot's x̂0, computed through exactly the denoising the
engine runs, regressed on the VAE latent of the filtered frame.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from tqdm import tqdm

from engine.config import LoadConfig, StreamConfig
from engine.control import canny
from engine.loading import load_bundle
from engine.models import DEMO_MODEL_DIR, ModelBundle
from engine.schedule import slot_schedule
from training.demo_model.data import TRAIN_IMAGES, CropSampler, load_images
from training.demo_model.train import cosine_lr, style_batch, to_tensor, unrolled_x0

logger = logging.getLogger(__name__)

__all__ = ["ControlNetSettings", "build_controlnet", "control_images", "controlnet_inputs", "train"]


@dataclass(frozen=True)
class ControlNetSettings:
    """How the demo ControlNet is trained (the defaults reproduce the committed engine/demo_controlnet).

    Args:
        steps (`int`, defaults to 1500): optimiser steps (chosen to finish within an hour on one core of a
            shared 2-core machine; docs/controlnet.md).
        batch (`int`, defaults to 12): crops per step (the stylizer's).
        crops (`tuple[int, ...]`, defaults to `(128, 192)`): crop sides in pixels, one per step in turn. The
            stylizer's 96² crops gave a ControlNet that barely helped at the engine's 256², 192² alone one that
            helped at 256² and hurt some styles at 128² (trials in docs/controlnet.md).
        learning_rate (`float`, defaults to 1e-3): peak AdamW learning rate, with the stylizer's warm-up and
            cosine decay to 5%.
        conditioning_scale (`float`, defaults to 1.0): scale of the residuals during training (the engine's
            default `controlnet_scale`).
        embedding_channels (`tuple[int, ...]`, defaults to `(16, 32, 64, 64)`): channels of the conditioning
            embedding's stages (three stride-2 steps from pixels to the latent grid). diffusers' default
            (16, 32, 96, 256) has 3× the parameters, most of them in its two widest stages.
        low_threshold (`int`, defaults to 100): canny low threshold of the control images.
        high_threshold (`int`, defaults to 200): canny high threshold of the control images.
        fallback_share (`float`, defaults to 0.25): share of crops trained to the identity (`photo`), as the
            stylizer was.
        seed (`int`, defaults to 0): seed of the conditioning embedding's initial weights, crops, styles,
            prompts and noise.
    """

    steps: int = 1500
    batch: int = 12
    crops: tuple[int, ...] = (128, 192)
    learning_rate: float = 1e-3
    conditioning_scale: float = 1.0
    embedding_channels: tuple[int, ...] = (16, 32, 64, 64)
    low_threshold: int = 100
    high_threshold: int = 200
    fallback_share: float = 0.25
    seed: int = 0


def build_controlnet(unet: UNet2DConditionModel, embedding_channels: tuple[int, ...] = (16, 32, 64, 64),
                     ) -> ControlNetModel:
    """A canny ControlNet for `unet`: its down and mid blocks copied, zero-initialised residual outputs.

    At initialisation every residual is zero, so the ControlNet starts as the plain UNet's output; only the
    conditioning embedding (3-channel control image to the first block's width) starts random.
    """
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(embedding_channels),
                                     conditioning_channels=3)


def control_images(frames: list[np.ndarray], low_threshold: int = 100, high_threshold: int = 200) -> torch.Tensor:
    """`[B, 3, H, W]` canny control images (`engine.control.canny`) of RGB uint8 frames."""
    return torch.stack([canny(frame, low_threshold, high_threshold) for frame in frames])


def controlnet_inputs(controlnet: ControlNetModel, x_t: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                      control: torch.Tensor, conditioning_scale: float) -> dict[str, object]:
    """The ControlNet's residuals for one UNet call, as the UNet's keyword arguments.

    The ControlNet sees what the UNet sees (the noisy latent, its timestep and the prompt) plus the control
    image; diffusers scales every residual by `conditioning_scale`.
    """
    down, mid = controlnet(x_t, timesteps, encoder_hidden_states=text, controlnet_cond=control,
                           conditioning_scale=conditioning_scale, return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _encode_prompts(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
    tokens = bundle.tokenizer(prompts, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    return bundle.text_encoder(tokens)[0]


def train(settings: ControlNetSettings, out: Path, model: Path = DEMO_MODEL_DIR) -> dict:
    """Train the ControlNet of the model folder `model` (frozen) and save it to `out`; returns the record.

    `out` gets the diffusers folder (`config.json`, `diffusion_pytorch_model.safetensors`) and `training.json`
    with the settings, the losses with and without the ControlNet and the run time.
    """
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    # Eager PyTorch on the CPU in float32 (training needs autograd); eval mode, no gradients.
    bundle = load_bundle(LoadConfig(model=str(model), device="cpu", dtype="float32", backend="eager"))
    controlnet = build_controlnet(bundle.unet, settings.embedding_channels)
    controlnet.train()
    images = load_images(TRAIN_IMAGES)
    samplers = [CropSampler(images, crop, seed=settings.seed + index) for index, crop in enumerate(settings.crops)]
    config = StreamConfig()  # the engine's defaults: what `demo` is served with
    schedule = slot_schedule(bundle.scheduler, config.num_inference_steps, config.t_index_list, 1,
                             torch.device("cpu"), torch.float32)
    scaling = float(bundle.vae.config.scaling_factor)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
    weights = [0.5] * (schedule.num_slots - 1) + [1.0]  # the stylizer's: the last slot is what the engine outputs
    logged: list[tuple[float, float]] = []  # (with the ControlNet, demo alone) at the log steps
    for step in tqdm(range(settings.steps), desc="controlnet", mininterval=5):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.steps, settings.learning_rate)
        sampler = samplers[step % len(samplers)]
        inputs, targets, prompts = style_batch(sampler, settings.batch, rng, settings.fallback_share)
        with torch.no_grad():
            latents = bundle.vae.encode(to_tensor(inputs)).latents * scaling
            target = bundle.vae.encode(to_tensor(targets)).latents * scaling
            text = _encode_prompts(bundle, prompts)
        control = control_images(inputs, settings.low_threshold, settings.high_threshold)
        noises = [torch.randn_like(latents) for _ in range(schedule.num_slots)]

        def residuals(x_t: torch.Tensor, timesteps: torch.Tensor, text=text, control=control) -> dict[str, object]:
            return controlnet_inputs(controlnet, x_t, timesteps, text, control, settings.conditioning_scale)

        outputs = unrolled_x0(bundle.unet, latents, text, schedule, config, noises, residuals)
        # In unscaled latent units, as the stylizer's loss (and its learning rate) is.
        loss = sum(w * F.mse_loss(x0, target) for w, x0 in zip(weights, outputs, strict=True)) / sum(weights)
        loss = loss / scaling**2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == settings.steps - 1:
            # The same batch and noise without the ControlNet: what the demo alone scores, so the log shows the gain.
            with torch.no_grad():
                plain = unrolled_x0(bundle.unet, latents, text, schedule, config, noises)[-1]
            logged.append((F.mse_loss(outputs[-1], target).item() / scaling**2,
                           F.mse_loss(plain, target).item() / scaling**2))
            logger.info("controlnet step %d: loss %.4f, last slot MSE %.4f (demo alone %.4f)", step, loss.item(),
                        *logged[-1])
    controlnet.eval().requires_grad_(False)
    out.mkdir(parents=True, exist_ok=True)
    controlnet.save_pretrained(out)
    record = {"settings": asdict(settings), "model": str(model) if model != DEMO_MODEL_DIR else "demo",
              # Last-slot latent MSE over the last ten log steps' batches, with the ControlNet and without.
              "latent_mse": round(float(np.mean([with_cn for with_cn, _ in logged[-10:]])), 5),
              "latent_mse_demo_alone": round(float(np.mean([alone for _, alone in logged[-10:]])), 5),
              "parameters": sum(p.numel() for p in controlnet.parameters()),
              "train_images": list(TRAIN_IMAGES), "seconds": round(time.perf_counter() - started),
              "torch_threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("saved the demo ControlNet to %s after %d s", out, record["seconds"])
    return record
