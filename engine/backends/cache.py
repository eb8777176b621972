"""The on-disk cache of exported ONNX graphs and built TensorRT engines (`trt_cache/` by default).

Every artifact is named by `engine_cache_key`: a hash of everything that changes the compiled
graph (model config and weights, resolution, batch, guidance mode, dtype, TensorRT version, GPU,
exporter and opset). A changed part gives a new file, so a stale engine is never loaded. Files are
written under a temporary name and renamed, so a crash mid-write leaves no half file under the
real name; a file that is there but unreadable is deleted and rebuilt by `cached_artifact`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "trt_cache"
CACHE_DIR_ENV = "STREAMDIFF_TRT_CACHE"

T = TypeVar("T")


def default_cache_dir() -> Path:
    """`$STREAMDIFF_TRT_CACHE` when set, else `trt_cache/` in the working directory."""
    return Path(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR))


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's class, its diffusers config and every parameter and buffer's bytes."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        # Keys starting with "_" are bookkeeping (file name, diffusers version, and a set of defaulted
        # names whose order changes from one process to the next), not architecture.
        architecture = {name: value for name, value in dict(config).items() if not name.startswith("_")}
        digest.update(json.dumps(architecture, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # A byte view works for every dtype (numpy has no bfloat16); flattening a contiguous copy hashes the
        # values in logical order, so a channels_last module hashes like its row-major twin.
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKeyParts:
    """Everything an exported graph or built engine depends on (the fields of its cache key)."""

    network: str
    model_hash: str
    width: int
    height: int
    batch: int
    cfg_type: str
    dtype: str
    kv_cache: bool
    exporter: str
    opset: int
    tensorrt_version: str = "none"
    gpu_name: str = "cpu"


def engine_cache_key(parts: CacheKeyParts) -> str:
    """A file-name-safe key: readable fields first (for people), then a hash of all parts."""
    digest = hashlib.sha256(json.dumps(asdict(parts), sort_keys=True).encode()).hexdigest()[:20]
    return f"{parts.network}-{parts.width}x{parts.height}-b{parts.batch}-{parts.cfg_type}-{parts.dtype}-{digest}"


def tensorrt_version() -> str:
    """The installed TensorRT version, or `"none"`."""
    try:
        import tensorrt
    except ImportError:
        return "none"
    return str(tensorrt.__version__)


def gpu_name() -> str:
    """The current CUDA device's name, or `"cpu"`."""
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(torch.cuda.current_device())


def _remove_artifact(path: Path) -> None:
    """Delete `path` and its companions (an ONNX file's external weights `<name>.data`)."""
    for companion in path.parent.glob(f"{path.name}.*"):
        companion.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(temporary_path)`, then move what it wrote to `path`, the main file last.

    `temporary_path` has `path`'s own name inside a private folder beside it, so companion files
    (an ONNX file's external `<name>.data`) keep the names the main file refers to. The main file
    appears under its real name only once everything it needs is in place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        write(staging / path.name)
        if not (staging / path.name).is_file():
            raise RuntimeError(f"building {path.name} wrote no file")
        for written in sorted(staging.iterdir(), key=lambda item: item.name == path.name):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def cached_artifact(path: Path, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """Load `path`, building it first when it is missing; a file that fails to load is rebuilt once.

    `build(temporary_path)` writes the artifact; `load(path)` must raise on a corrupt or partial file.
    """
    if path.is_file():
        try:
            return load(path)
        except Exception as error:  # ONNX, ORT and TensorRT each raise their own types on a bad file
            logger.warning("cached %s is unreadable (%s: %s); rebuilding it", path.name, type(error).__name__, error)
            _remove_artifact(path)
    logger.info("building %s", path)
    atomic_write(path, build)
    return load(path)
