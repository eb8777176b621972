"""Training the `demo` model: its untrained architecture and the two training stages.

The model has the architecture the engine serves (byte-level CLIP tokenizer and `CLIPTextModel`,
`UNet2DConditionModel`, `AutoencoderTiny`, `LCMScheduler`), small enough to train on a CPU. Two stages,
both on augmented crops of scikit-image's photographs (`training.demo_model.data`):

1. the tiny VAE learns to reconstruct photos and their stylised versions;
2. with the VAE frozen, the UNet and text encoder learn to turn a frame into the style its prompt names
   (`training.demo_model.styles`), through exactly the few-step denoising the engine runs.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from engine import guidance
from engine.builtin_models import build_byte_level_tokenizer
from engine.config import LoadConfig, StreamConfig
from engine.loading import load_bundle
from engine.models import ModelBundle
from engine.schedule import SlotSchedule, add_noise, predict_x0, slot_schedule

from .data import TRAIN_IMAGES, CropSampler, load_images
from .styles import FALLBACK_STYLE, STYLES, sample_prompt, stylize

logger = logging.getLogger(__name__)

__all__ = ["TrainSettings", "build_demo_bundle", "cosine_lr", "style_batch", "to_tensor", "train", "unrolled_x0"]


@dataclass(frozen=True)
class TrainSettings:
    """How the `demo` model is trained (the defaults reproduce the committed checkpoint).

    Args:
        vae_steps (`int`, defaults to 2000): optimiser steps of the VAE stage.
        unet_steps (`int`, defaults to 4000): optimiser steps of the stylizer stage (docs/demo_model.md compares
            4000 with 2000).
        vae_batch (`int`, defaults to 8): crops per VAE step (chosen over 16 by PSNR per CPU-second;
            docs/demo_model.md).
        vae_crop (`int`, defaults to 64): crop side of the VAE stage (it is fully convolutional).
        unet_batch (`int`, defaults to 12): crops per stylizer step.
        unet_crop (`int`, defaults to 96): crop side of the stylizer stage (the UNet is convolutional too).
        vae_learning_rate (`float`, defaults to 3e-3): peak AdamW learning rate of the VAE stage.
        learning_rate (`float`, defaults to 1e-3): peak AdamW learning rate of the stylizer stage (both
            decay on a cosine to 5%).
        edge_weight (`float`, defaults to 1.0): weight of the VAE's image-gradient L1 term (sharp edges).
        latent_scale (`float`, defaults to 5.0): the VAE's `scaling_factor`; see `train`.
        fallback_share (`float`, defaults to 0.25): share of stylizer samples trained to the identity
            (`photo` and prompts naming no style).
        seed (`int`, defaults to 0): seed of weights, crops, styles, prompts and noise.
    """

    vae_steps: int = 2000
    unet_steps: int = 4000
    vae_batch: int = 8
    vae_crop: int = 64
    unet_batch: int = 12
    unet_crop: int = 96
    vae_learning_rate: float = 3e-3
    learning_rate: float = 1e-3
    edge_weight: float = 1.0
    latent_scale: float = 5.0
    fallback_share: float = 0.25
    seed: int = 0


# --------------------------------------------------------------------------- architecture


def build_demo_bundle(seed: int = 0) -> ModelBundle:
    """The untrained `demo` architecture: about 1.7 M UNet, 0.3 M VAE and 0.14 M text encoder parameters."""
    torch.manual_seed(seed)
    tokenizer = build_byte_level_tokenizer()
    vocab_size = len(tokenizer.get_vocab())
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=64, bos_token_id=vocab_size - 2, eos_token_id=eos,
        pad_token_id=eos,
    ))
    # Cross-attention only at the two coarser levels: the style is a global choice, and self-attention
    # over the finest latent grid would dominate the CPU cost at 256 px.
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderTiny(encoder_block_out_channels=(32,) * 4, decoder_block_out_channels=(32,) * 4,
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    return ModelBundle(name="demo", tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                       scheduler=LCMScheduler())


# --------------------------------------------------------------------------- batches


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """RGB uint8 `[H, W, 3]` images to a `[B, 3, H, W]` batch in [-1, 1] (the VAE's range)."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1


def style_batch(sampler: CropSampler, size: int, rng: random.Random, fallback_share: float | None = None,
                ) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """`size` crops, each with a random style's filter output and a random prompt naming that style.

    With `fallback_share`, that share of the crops gets the fallback style (identity), the rest a style
    among the others; without it every style is equally likely.
    """
    names = list(STYLES)
    others = [name for name in names if name != FALLBACK_STYLE]
    inputs, targets, prompts = [], [], []
    for _ in range(size):
        crop = sampler.sample()
        if fallback_share is None:
            style = rng.choice(names)
        else:
            style = FALLBACK_STYLE if rng.random() < fallback_share else rng.choice(others)
        inputs.append(crop)
        targets.append(stylize(crop, style))
        prompts.append(sample_prompt(style, rng))
    return inputs, targets, prompts


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Learning rate at `step` of `total`: linear warm-up over the first 5%, then a cosine decay to 5% of `peak`."""
    warmup = max(total // 20, 1)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- stage 1: the VAE


def _gradient_l1(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance between the horizontal and vertical pixel differences of two image batches."""
    dy = F.l1_loss(output[..., 1:, :] - output[..., :-1, :], target[..., 1:, :] - target[..., :-1, :])
    dx = F.l1_loss(output[..., :, 1:] - output[..., :, :-1], target[..., :, 1:] - target[..., :, :-1])
    return dy + dx


def train_vae(vae: AutoencoderTiny, sampler: CropSampler, settings: TrainSettings, rng: random.Random) -> float:
    """Train the tiny VAE to reconstruct photos and stylised photos; returns the last steps' mean L1."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    vae.train().requires_grad_(True)
    recent: list[float] = []
    for step in tqdm(range(settings.vae_steps), desc="vae", mininterval=5):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.vae_steps, settings.vae_learning_rate)
        inputs, targets, _ = style_batch(sampler, settings.vae_batch, rng)
        images = to_tensor(inputs[: settings.vae_batch // 2] + targets[settings.vae_batch // 2:])
        latents = vae.encode(images).latents
        # Roughly unit-variance latents per channel, like SD's scaled latents: the noise schedule's
        # signal-to-noise ratios are then set by `scaling_factor` alone (see `train`).
        moments = latents.mean(dim=(0, 2, 3)).pow(2).mean() + (latents.std(dim=(0, 2, 3)) - 1).pow(2).mean()
        # Noisy latents teach the decoder to tolerate the UNet's imperfect outputs.
        decoded = vae.decode(latents + 0.05 * torch.randn_like(latents)).sample
        l1 = F.l1_loss(decoded, images)
        # L1 on image gradients: plain L1/MSE are satisfied by blurred edges, the weak point of a small VAE.
        loss = l1 + F.mse_loss(decoded, images) + settings.edge_weight * _gradient_l1(decoded, images) + 0.1 * moments
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [l1.item()])[-50:]
        if step % 100 == 0 or step == settings.vae_steps - 1:
            logger.info("vae step %d: L1 %.4f, latent moments %.4f", step, l1.item(), moments.item())
    vae.eval().requires_grad_(False)
    return float(np.mean(recent))


# --------------------------------------------------------------------------- stage 2: the stylizer


def unrolled_x0(unet: UNet2DConditionModel, latents: torch.Tensor, text: torch.Tensor, schedule: SlotSchedule,
                config: StreamConfig, noises: list[torch.Tensor] | None = None,
                unet_inputs: Callable[[torch.Tensor, torch.Tensor], dict] | None = None) -> list[torch.Tensor]:
    """Every slot's x̂0 for one input latent, computed as the engine's sequential step computes it.

    Training through this exact computation (the default schedule, RCFG `self` guidance with its stock
    noise, LCM boundary scalings, re-noising between slots) means the served stream reproduces what was
    trained: the stream batch equals sequential denoising in every mode (tests/engine/test_stream.py).
    Guidance modes `none` and `self` only (the ones without negative-prompt rows).

    Args:
        unet (`UNet2DConditionModel`): the denoiser.
        latents (`torch.Tensor`): `[B, C, h, w]` scaled VAE latents of the input frames.
        text (`torch.Tensor`): `[B, L, D]` prompt embeddings.
        schedule (`SlotSchedule`): the engine's slot schedule for one frame per slot.
        config (`StreamConfig`): guidance mode, scale and δ.
        noises (`list[torch.Tensor]`, *optional*): per slot, the noise added to the latent entering it
            (the first is also the RCFG stock noise), each broadcastable to `latents`; with the engine's fixed
            noise this is the engine's own computation for the frame. Fresh Gaussian noise when not given.
        unet_inputs (`Callable`, *optional*): `(x_t, timesteps)` to extra keyword arguments of each UNet call,
            e.g. a ControlNet's `down_block_additional_residuals` and `mid_block_additional_residual`.
    """
    batch = latents.shape[0]
    if noises is None:
        noises = [torch.randn_like(latents) for _ in range(schedule.num_slots)]
    stock = noises[0] if guidance.uses_stock_noise(config.cfg_type) else None
    current = schedule.slots(0, 1)
    x_t = add_noise(latents, noises[0], current.alpha, current.beta)
    outputs = []
    for k in range(schedule.num_slots):
        timesteps = current.timesteps.expand(batch)
        extra = unet_inputs(x_t, timesteps) if unet_inputs is not None else {}
        eps_cond = unet(x_t, timesteps, encoder_hidden_states=text, return_dict=False, **extra)[0]
        eps, stock = guidance.guide(config.cfg_type, eps_cond, stock, config.guidance_scale, config.delta, 1)
        x0 = predict_x0(x_t, eps, current)
        outputs.append(x0)
        if k == schedule.num_slots - 1:
            break
        following = schedule.slots(k + 1, k + 2)
        if stock is not None:
            stock = guidance.carry_stock_noise(eps, stock, current, following, noises[k + 1])
        x_t = add_noise(x0, noises[k + 1], following.alpha, following.beta)
        current = following
    return outputs


def train_stylizer(bundle: ModelBundle, sampler: CropSampler, settings: TrainSettings, rng: random.Random) -> float:
    """Train UNet and text encoder so the engine's output latent is the VAE latent of the filtered frame.

    Why a direct x̂0 loss: the engine never samples from noise; it noises the frame's latent to two fixed
    timesteps and takes LCM consistency outputs x̂0 = c_out·(x_t − β·ε)/α + c_skip·x_t. A consistency
    model is exactly a function from (x_t, t, prompt) to the clean endpoint, so regressing that endpoint on
    E(filter(x)) — instead of an ε-loss against the injected noise, which would teach a denoiser of x, not
    a transform of it — trains the quantity the engine decodes. At the engine's timesteps c_skip ≈ 0 and
    c_out ≈ 1, so the gradient reaches the UNet's ε output almost unscaled. Returns the last steps' mean loss.
    """
    config = StreamConfig()  # the engine's defaults: what `demo` is served with
    schedule = slot_schedule(bundle.scheduler, config.num_inference_steps, config.t_index_list, 1,
                             torch.device("cpu"), torch.float32)
    scaling = float(bundle.vae.config.scaling_factor)
    modules = [bundle.unet, bundle.text_encoder]
    parameters = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=1e-4)
    for module in modules:
        module.train().requires_grad_(True)
    weights = [0.5] * (schedule.num_slots - 1) + [1.0]  # the last slot is what the engine outputs
    recent: list[float] = []
    for step in tqdm(range(settings.unet_steps), desc="stylizer", mininterval=5):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, settings.unet_steps, settings.learning_rate)
        inputs, targets, prompts = style_batch(sampler, settings.unet_batch, rng, settings.fallback_share)
        with torch.no_grad():
            latents = bundle.vae.encode(to_tensor(inputs)).latents * scaling
            target = bundle.vae.encode(to_tensor(targets)).latents * scaling
        tokens = bundle.tokenizer(prompts, padding="max_length", max_length=bundle.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        text = bundle.text_encoder(tokens)[0]
        outputs = unrolled_x0(bundle.unet, latents, text, schedule, config)
        # In unscaled latent units, so the loss (and the learning rate that suits it) does not depend on the scale.
        loss = sum(w * F.mse_loss(x0, target) for w, x0 in zip(weights, outputs, strict=True)) / sum(weights)
        loss = loss / scaling**2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        recent = (recent + [F.mse_loss(outputs[-1], target).item() / scaling**2])[-50:]
        if step % 50 == 0 or step == settings.unet_steps - 1:
            logger.info("stylizer step %d: loss %.4f (last slot MSE %.4f)", step, loss.item(), recent[-1])
    for module in modules:
        module.eval().requires_grad_(False)
    return float(np.mean(recent))


# --------------------------------------------------------------------------- entry points


def train(settings: TrainSettings, out: Path, resume: Path | None = None) -> dict:
    """Train both stages and save the `demo` diffusers folder to `out`; returns the training record.

    With `resume`, both stages continue from that saved folder's weights instead of a fresh build.
    """
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    bundle = (load_bundle(LoadConfig(model=str(resume), device="cpu", dtype="float32")) if resume is not None
              else build_demo_bundle(settings.seed))
    history = json.loads((resume / "training.json").read_text())["runs"] if resume is not None else []
    images = load_images(TRAIN_IMAGES)
    vae_l1 = train_vae(bundle.vae, CropSampler(images, settings.vae_crop, seed=settings.seed), settings, rng)
    vae_seconds = time.perf_counter() - started
    logger.info("vae stage done: L1 %.4f after %.0f s", vae_l1, vae_seconds)
    # The engine multiplies latents by `scaling_factor` before noising them to t = 359, where ᾱ ≈ 0.49: at
    # unit variance the frame's latent would sit at a signal-to-noise ratio near 1 and the small UNet could
    # not recover the content (outputs were soft blobs). A scale of 5 raises that ratio to about 24, so the
    # frame survives the noise and the UNet's job is mostly the style (trials of scales 1/3/5: docs/demo_model.md).
    bundle.vae.register_to_config(scaling_factor=settings.latent_scale)
    stylizer_mse = train_stylizer(bundle, CropSampler(images, settings.unet_crop, seed=settings.seed + 1),
                                  settings, rng)
    record = {"settings": asdict(settings), "resumed": resume is not None, "vae_l1": round(vae_l1, 5),
              "stylizer_latent_mse": round(stylizer_mse, 5), "train_images": list(TRAIN_IMAGES),
              "styles": list(STYLES), "vae_seconds": round(vae_seconds),
              "seconds": round(time.perf_counter() - started),
              "torch_threads": torch.get_num_threads()}
    bundle.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"runs": [*history, record]}, indent=2) + "\n")
    logger.info("saved the demo model to %s after %d s", out, record["seconds"])
    return record
