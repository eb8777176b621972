"""Streaming image-to-image diffusion engine (StreamDiffusion-style), with no web code."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import EngineConfig
    from .loading import load_bundle
    from .models import ModelBundle, ModelLoadError, load_models
    from .stream import StepResult, StreamEngine

__all__ = ["EngineConfig", "ModelBundle", "ModelLoadError", "StepResult", "StreamEngine", "load_bundle", "load_models"]

# Loaded on first use (PEP 562) so that importing a light module such as `engine.config` does not pull in
# torch and diffusers.
_LAZY = {
    "EngineConfig": "config",
    "ModelBundle": "models",
    "ModelLoadError": "models",
    "load_bundle": "loading",
    "load_models": "models",
    "StepResult": "stream",
    "StreamEngine": "stream",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
