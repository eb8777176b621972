"""From load-time settings to a ready model set: load the models and put them on their device and dtype.

The one place that reads the load-time fields of an `EngineConfig` (model, use_tiny_vae, taesd,
model_config, device, dtype), so every caller loads a model the same way.
"""

from __future__ import annotations

import logging
import time

import torch

from .config import EngineConfig
from .models import ModelBundle, load_models

logger = logging.getLogger(__name__)

__all__ = ["load_bundle", "resolve_device", "resolve_dtype"]


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_bundle(config: EngineConfig) -> ModelBundle:
    """The `ModelBundle` of `config.model`, on `config.device` in `config.dtype`, in eval mode.

    Args:
        config (`EngineConfig`): its load-time settings are used: `model`, `use_tiny_vae`, `taesd`,
            `model_config` (see `engine.models.load_models`), `device` and `dtype` (`auto` resolved by
            `resolve_device` / `resolve_dtype`).

    Raises:
        ModelLoadError: naming what was tried and what to do instead.
    """
    started = time.perf_counter()
    models = load_models(config.model, use_tiny_vae=config.use_tiny_vae, taesd=config.taesd,
                         config=config.model_config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    logger.info("model %r loaded in %.1f s; moving to %s (%s)", models.name, time.perf_counter() - started,
                device, str(dtype).removeprefix("torch."))
    return models.to(device, dtype)
