"""Streaming image-to-image diffusion engine (StreamDiffusion-style), with no web code."""

from .config import EngineConfig
from .models import ModelBundle, ModelLoadError, load_models
from .stream import StepResult, StreamEngine

__all__ = ["EngineConfig", "ModelBundle", "ModelLoadError", "StepResult", "StreamEngine", "load_models"]
