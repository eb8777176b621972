"""Streaming image-to-image diffusion engine (StreamDiffusion-style), with no web code.

The public API: `LoadConfig` and `StreamConfig` (what to load, how each stream runs), `Engine` (the shared,
loaded models), `StreamEngine` (one stream, in process) and `StreamRuntime` (the threaded contract a server
uses: load once, open streams, put frames, get answers, status).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import LoadConfig, StreamConfig
    from .loading import Engine, load_bundle
    from .models import ModelBundle, ModelLoadError, load_models
    from .runtime import RuntimeOptions, RuntimeStatus, StreamRuntime
    from .stream import StreamEngine
    from .stream_state import StepResult

__all__ = ["Engine", "LoadConfig", "ModelBundle", "ModelLoadError", "RuntimeOptions", "RuntimeStatus", "StepResult",
           "StreamConfig", "StreamEngine", "StreamRuntime", "load_bundle", "load_models"]

# Loaded on first use (PEP 562) so that importing a light module such as `engine.config` does not pull in
# torch and diffusers.
_LAZY = {
    "Engine": "loading",
    "LoadConfig": "config",
    "ModelBundle": "models",
    "ModelLoadError": "models",
    "RuntimeOptions": "runtime",
    "RuntimeStatus": "runtime",
    "StepResult": "stream_state",
    "StreamConfig": "config",
    "StreamEngine": "stream",
    "StreamRuntime": "runtime",
    "load_bundle": "loading",
    "load_models": "models",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
