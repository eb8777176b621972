"""`make_runner`: the `NetworkRunner` of a `--backend` choice, built once and shared by streams."""

from __future__ import annotations

import logging
import shutil
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import BACKENDS, LoadConfig, StreamConfig
from ..models import ModelBundle
from .base import NetworkRunner
from .eager import EagerRunner
from .errors import BackendUnavailableError
from .onnx_export import DEFAULT_EXPORTER
from .resolution import ResolutionRange
from .split import SplitRunner

logger = logging.getLogger(__name__)

_runners: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_runners_lock = threading.Lock()


def _models_device(models: ModelBundle) -> torch.device:
    return next(models.unet.parameters()).device


def _models_dtype(models: ModelBundle) -> str:
    return str(next(models.unet.parameters()).dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Availability:
    """What this machine offers the backends: the input of `choose_backend`, probed by `probe_availability`.

    Args:
        device_type (`str`): the models' device type (`cpu`, `cuda`, ...).
        tensorrt_reason (`str | None`): why TensorRT cannot run here (with the command that fixes it), None
            when it can.
        onnxruntime_providers (`tuple[str, ...] | None`): ONNX Runtime's execution providers, None when the
            package does not import.
        onnxruntime_error (`str | None`): why `onnxruntime` does not import, when it does not.
        dtype (`str`): the models' dtype (ONNX Runtime runs float32 and float16 graphs only).
        compile_reason (`str | None`): why torch.compile cannot run here, None when it can.
        measured_fps (`tuple[tuple[str, float], ...]`): frames per second of the backends timed on this machine
            (`engine.backends.auto`); empty when nothing was measured.
    """

    device_type: str
    tensorrt_reason: str | None
    onnxruntime_providers: tuple[str, ...] | None
    onnxruntime_error: str | None = None
    dtype: str = "float32"
    compile_reason: str | None = None
    measured_fps: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class BackendChoice:
    """A concrete backend and why it was chosen."""

    backend: str
    reason: str


def probe_availability(device: torch.device, dtype: str = "float32") -> Availability:
    """Probe what the backends need for `dtype` models on `device`; never raises (a broken install is a reason)."""
    from .tensorrt import tensorrt_unavailable_reason

    try:
        import onnxruntime

        providers: tuple[str, ...] | None = tuple(onnxruntime.get_available_providers())
        onnxruntime_error = None
    except Exception as error:  # a broken install raises more than ImportError (a missing shared library)
        providers, onnxruntime_error = None, f"{type(error).__name__}: {error}"
    return Availability(device.type, tensorrt_unavailable_reason(), providers, onnxruntime_error, dtype,
                        compile_unavailable_reason())


def compile_unavailable_reason() -> str | None:
    """Why torch.compile (Inductor) cannot build kernels here: it needs a C++ compiler on the PATH."""
    if any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return None
    return "torch.compile's Inductor needs a C++ compiler and none is on the PATH: apt-get install g++"


def unavailable_reason(backend: str, available: Availability) -> str | None:
    """Why concrete `backend` cannot run the models here, naming the command that fixes it; None when it can."""
    if backend == "eager":
        return None
    if backend == "compile":
        return available.compile_reason
    if backend == "onnxruntime":
        if available.onnxruntime_providers is None:
            detail = f" ({available.onnxruntime_error})" if available.onnxruntime_error else ""
            return f"onnxruntime does not import{detail}: pip install -e '.[onnx]'"
        if available.dtype not in ("float32", "float16"):
            return f"the onnxruntime backend runs float32 or float16 models, these are {available.dtype}"
        if available.device_type == "cuda" and "CUDAExecutionProvider" not in available.onnxruntime_providers:
            return ("the models are on CUDA and this onnxruntime has no CUDA execution provider: "
                    "pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
        return None
    if backend == "tensorrt":
        if available.tensorrt_reason is not None:
            return available.tensorrt_reason
        if available.device_type != "cuda":
            return f"the models are on {available.device_type}, TensorRT runs CUDA models: use --device cuda"
        from .tensorrt import tensorrt_dtype_reason

        return tensorrt_dtype_reason(available.dtype)
    raise ValueError(f"unknown backend {backend!r}")


def choose_backend(name: str, available: Availability | None) -> BackendChoice:
    """The concrete backend of `name` and why: a pure function of what `available` says this machine has.

    `auto` is TensorRT where it can run the models; else, when `available.measured_fps` holds speeds
    measured here (`engine.backends.auto`), the fastest of them that can run; else ONNX Runtime where it has a
    provider for their device (a CPU-only onnxruntime never serves CUDA models), else eager. A concrete name
    is taken as asked (its runner raises `BackendUnavailableError` when it cannot run), so `available` may
    then be None.
    """
    if name not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {name!r}")
    if name != "auto":
        return BackendChoice(name, "asked for by name")
    if available is None:
        raise ValueError("`auto` needs the probed availability")
    tensorrt_reason = unavailable_reason("tensorrt", available)
    if tensorrt_reason is None:
        return BackendChoice("tensorrt", "CUDA and TensorRT are present")
    measured = [(fps, backend) for backend, fps in available.measured_fps
                if unavailable_reason(backend, available) is None]
    if measured:
        fps, backend = max(measured)
        return BackendChoice(backend, f"the fastest measured here ({fps:.1f} fps; no TensorRT: {tensorrt_reason})")
    onnxruntime_reason = unavailable_reason("onnxruntime", available)
    if onnxruntime_reason is None:
        return BackendChoice("onnxruntime", f"no TensorRT ({tensorrt_reason})")
    return BackendChoice("eager", f"neither TensorRT ({tensorrt_reason}) nor an onnxruntime for "
                                  f"{available.device_type} ({onnxruntime_reason}) can run here")


def resolve_backend_choice(name: str, models: ModelBundle) -> BackendChoice:
    """`choose_backend` for `models` on this machine; an `auto` choice is logged with its reason."""
    if name != "auto":
        return choose_backend(name, None)
    choice = choose_backend(name, probe_availability(_models_device(models), _models_dtype(models)))
    logger.info("--backend auto chose %s: %s", choice.backend, choice.reason)
    return choice


def resolve_backend(name: str, models: ModelBundle) -> str:
    """The concrete backend of `name` for `models` (see `choose_backend`)."""
    return resolve_backend_choice(name, models).backend


def new_runner(backend: str, models: ModelBundle, cfg_type: str = "self", cache_dir: Path | None = None,
               exporter: str = DEFAULT_EXPORTER, resolution_range: ResolutionRange | None = None,
               cache_max_gb: float | None = None) -> NetworkRunner:
    """A new, unshared runner of a concrete backend (`make_runner` is what engines use); `resolution_range`
    gives the compiled backends dynamic-shape graphs (the others run any size anyway); `cache_max_gb` bounds
    TensorRT's engines in the cache (`LoadConfig.trt_cache_max_gb`)."""
    if backend == "eager":
        return EagerRunner(models)
    if backend == "onnxruntime":
        from .onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(models, cfg_type, cache_dir, exporter, resolution_range=resolution_range)
    if backend == "tensorrt":
        from .tensorrt import TensorRTRunner

        return TensorRTRunner(models, cfg_type, cache_dir, exporter, resolution_range=resolution_range,
                              cache_max_gb=cache_max_gb)
    if backend == "compile":
        from .compiled import TorchCompileRunner

        return TorchCompileRunner(models)
    raise BackendUnavailableError(f"no runner for backend {backend!r}")


def make_runner(models: ModelBundle, config: LoadConfig, stream: StreamConfig | None = None,
                cache_dir: Path | None = None, exporter: str = DEFAULT_EXPORTER) -> NetworkRunner:
    """The runner of `config.backend` (and `config.vae_backend`) for `models`, shared while any engine holds it.

    Runners are kept per (models, backend, guidance mode, cache folder, exporter, resolution range):
    streams of one model set share one runner and its compiled graphs, whatever their size. With a
    `vae_backend` other than the UNet's, a shared `SplitRunner` joins the two backends' shared runners. With
    `stream`, the graphs a stream under it needs are opened (exported or built when not cached) before this
    returns. With `config.resolution_range`, compiled backends serve every size of the range from one
    dynamic-shape graph per network and batch.

    Raises:
        BackendUnavailableError: the backend cannot run here (e.g. `tensorrt` without CUDA).
        ValueError: a resolution range that does not fit the model (see `resolution.check_range`).
    """
    backend = resolve_backend(config.backend, models)
    vae_backend = resolve_backend(config.vae_backend, models) if config.vae_backend is not None else backend
    cfg_type = stream.cfg_type if stream is not None else "self"
    compiled = (cache_dir, exporter, config.resolution_range, config.trt_cache_max_gb)
    with _runners_lock:
        runner = _shared_runner(models, backend, cfg_type, *compiled)
        if vae_backend != backend:
            unet_runner, vae_runner = runner, _shared_runner(models, vae_backend, cfg_type, *compiled)
            key = ("split", id(unet_runner), id(vae_runner))
            runner = _runners.get(key)
            if runner is None or runner.unet_runner is not unet_runner or runner.vae_runner is not vae_runner:
                runner = SplitRunner(unet_runner, vae_runner)
                _runners[key] = runner
    if stream is not None:
        runner.prepare(stream, config.kv_cache)
    return runner


def _shared_runner(models: ModelBundle, backend: str, cfg_type: str, cache_dir: Path | None,
                   exporter: str, resolution_range: ResolutionRange | None,
                   cache_max_gb: float | None) -> NetworkRunner:
    """The shared runner of one concrete backend (made when none is alive); called with `_runners_lock` held."""
    static = backend in ("onnxruntime", "tensorrt")
    key = (id(models), backend, cfg_type if static else None,
           str(cache_dir) if cache_dir is not None else None, exporter if static else None,
           resolution_range if static else None, cache_max_gb if backend == "tensorrt" else None)
    runner = _runners.get(key)
    if runner is None or runner.models is not models:
        runner = new_runner(backend, models, cfg_type, cache_dir, exporter, resolution_range, cache_max_gb)
        _runners[key] = runner
    return runner
