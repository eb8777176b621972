"""`make_runner`: the `NetworkRunner` of a `--backend` choice, built once and shared by streams."""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path

import torch

from ..config import BACKENDS, LoadConfig, StreamConfig
from ..models import ModelBundle
from .base import NetworkRunner
from .eager import EagerRunner
from .errors import BackendUnavailableError
from .onnx_export import DEFAULT_EXPORTER
from .split import SplitRunner

logger = logging.getLogger(__name__)

_runners: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_runners_lock = threading.Lock()


def _models_device(models: ModelBundle) -> torch.device:
    return next(models.unet.parameters()).device


def resolve_backend(name: str, models: ModelBundle) -> str:
    """The concrete backend of `name`; `auto` is TensorRT with CUDA and tensorrt, else ONNX Runtime where it can run
    on the models' device, else eager."""
    if name not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return name
    from .onnxruntime import onnxruntime_available
    from .tensorrt import tensorrt_unavailable_reason

    trt_reason = tensorrt_unavailable_reason()
    device = _models_device(models)
    if trt_reason is None and device.type == "cuda":
        chosen, why = "tensorrt", "CUDA and TensorRT are present"
    elif onnxruntime_available(device):
        chosen, why = "onnxruntime", f"no TensorRT ({trt_reason or 'the models are not on CUDA'})"
    else:
        # With models on CUDA, a CPU-only onnxruntime (what the `onnx` extra installs) cannot serve them.
        chosen, why = "eager", f"neither TensorRT nor an onnxruntime for {device.type} can run here"
    logger.info("--backend auto chose %s: %s", chosen, why)
    return chosen


def new_runner(backend: str, models: ModelBundle, cfg_type: str = "self", cache_dir: Path | None = None,
               exporter: str = DEFAULT_EXPORTER) -> NetworkRunner:
    """A new, unshared runner of a concrete backend (`make_runner` is what engines use)."""
    if backend == "eager":
        return EagerRunner(models)
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(models, cfg_type, cache_dir, exporter)
    if backend == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(models, cfg_type, cache_dir, exporter)
    if backend == "compile":
        from .compiled import TorchCompileRunner

        return TorchCompileRunner(models)
    raise BackendUnavailableError(f"no runner for backend {backend!r}")


def make_runner(models: ModelBundle, config: LoadConfig, stream: StreamConfig | None = None,
                cache_dir: Path | None = None, exporter: str = DEFAULT_EXPORTER) -> NetworkRunner:
    """The runner of `config.backend` (and `config.vae_backend`) for `models`, shared while any engine holds it.

    Runners are kept per (models, backend, guidance mode, cache folder, exporter): streams of one
    model set share one runner and its compiled graphs, whatever their size. With a `vae_backend`
    other than the UNet's, a shared `SplitRunner` joins the two backends' shared runners. With `stream`,
    the graphs a stream under it needs are opened (exported or built when not cached) before this returns.

    Raises:
        BackendUnavailableError: the backend cannot run here (e.g. `tensorrt` without CUDA).
    """
    backend = resolve_backend(config.backend, models)
    vae_backend = resolve_backend(config.vae_backend, models) if config.vae_backend is not None else backend
    cfg_type = stream.cfg_type if stream is not None else "self"
    with _runners_lock:
        runner = _shared_runner(models, backend, cfg_type, cache_dir, exporter)
        if vae_backend != backend:
            unet_runner, vae_runner = runner, _shared_runner(models, vae_backend, cfg_type, cache_dir, exporter)
            key = ("split", id(unet_runner), id(vae_runner))
            runner = _runners.get(key)
            if runner is None or runner.unet_runner is not unet_runner or runner.vae_runner is not vae_runner:
                runner = SplitRunner(unet_runner, vae_runner)
                _runners[key] = runner
    prepare = getattr(runner, "prepare", None)
    if prepare is not None and stream is not None:
        prepare(stream, config.kv_cache)
    return runner


def _shared_runner(models: ModelBundle, backend: str, cfg_type: str, cache_dir: Path | None,
                   exporter: str) -> NetworkRunner:
    """The shared runner of one concrete backend (made when none is alive); called with `_runners_lock` held."""
    static = backend in ("onnxruntime", "tensorrt")
    key = (id(models), backend, cfg_type if static else None,
           str(cache_dir) if cache_dir is not None else None, exporter if static else None)
    runner = _runners.get(key)
    if runner is None or runner.models is not models:
        runner = new_runner(backend, models, cfg_type, cache_dir, exporter)
        _runners[key] = runner
    return runner
