"""The on-disk cache of exported ONNX graphs and built TensorRT engines (`trt_cache/` by default).

Every artifact is named by `engine_cache_key`: a hash of everything that changes the compiled
graph (model config and weights, resolution or resolution range, batch, text length, guidance mode,
dtype, TensorRT version, GPU, exporter and opset; a ControlNet graph's model is the ControlNet's own
config and weights, a UNet graph taking ControlNet residuals is marked as such, and one taking an attention
bank holds its capacity). A changed part
gives a new file, so a stale engine is never loaded. Files are written under a temporary name and
renamed, so a crash mid-write leaves no half file under the real name. A file whose loader reports
it unreadable (`CorruptArtifactError`) is deleted and rebuilt by `cached_artifact`; any other load
error (out of memory, an unsupported engine) leaves the file alone and propagates, because
rebuilding would only fail again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "trt_cache"
CACHE_DIR_ENV = "STREAMDIFF_TRT_CACHE"

T = TypeVar("T")

DIGEST_SUFFIX = ".sha256"
# The key parts of an artifact, beside it: its name holds only a hash of most of them.
KEY_PARTS_SUFFIX = ".json"


class CorruptArtifactError(RuntimeError):
    """A cached file is unreadable (truncated, garbage, missing companion): delete it and rebuild it."""


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
    # The text length fixes the K/V inputs' shape (0 for the VAE graphs, which take no text).
    sequence_length: int = 0
    # (min, opt, max) pixels of a graph with dynamic height and width (`resolution.ResolutionRange`), whose
    # width and height are then the opt size; None for a static graph.
    resolution_range: tuple[int, int, int] | None = None
    # The LoRAs fused into the network (`SPEC:SCALE`), for people: `model_hash` already hashes the fused weights.
    loras: tuple[str, ...] = ()
    # A UNet graph that takes ControlNet residuals as inputs (an engine with a ControlNet). It serves any ControlNet
    # of its UNet; the `controlnet` network's own graph has the ControlNet's fingerprint as `model_hash`.
    control_residuals: bool = False
    # A UNet graph with an attention bank (`temporal="bank"`) of this many frames as inputs; 0 for none.
    attention_bank: int = 0


def engine_cache_key(parts: CacheKeyParts) -> str:
    """A file-name-safe key: readable fields first (for people), then a hash of all parts."""
    fields = asdict(parts)
    if parts.resolution_range is None:
        # Static graphs hash the fields they always had, so caches built before ranges existed stay valid.
        del fields["resolution_range"]
    if not parts.loras:
        # Likewise, graphs without LoRAs keep the keys they had before LoRAs existed.
        del fields["loras"]
    if not parts.control_residuals:
        # And graphs without ControlNet inputs the keys they had before ControlNets existed.
        del fields["control_residuals"]
    if not parts.attention_bank:
        # And graphs without an attention bank the keys they had before banks came to compiled graphs.
        del fields["attention_bank"]
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]
    if parts.resolution_range is None:
        size = f"{parts.width}x{parts.height}"
    else:
        size = f"{parts.resolution_range[0]}to{parts.resolution_range[2]}"
    network = f"{parts.network}+residuals" if parts.control_residuals else parts.network
    if parts.attention_bank:
        network += f"+bank{parts.attention_bank}"
    return f"{network}-{size}-b{parts.batch}-{parts.cfg_type}-{parts.dtype}-{digest}"


def tensorrt_version() -> str:
    """The installed TensorRT version, or `"none"` when it does not import (for any reason)."""
    try:
        import tensorrt
    except Exception:  # a broken install raises OSError (missing libnvinfer) or AttributeError, not ImportError
        return "none"
    return str(getattr(tensorrt, "__version__", "unknown"))


def gpu_name(device: torch.device | None = None) -> str:
    """The name of CUDA `device` (the current CUDA device when it has no index), or `"cpu"`."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return "cpu"
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_name(index)


def digest_path(path: Path) -> Path:
    """Where the SHA-256 of `path` is recorded (`<name>.sha256`, a companion of `path`)."""
    return path.with_name(path.name + DIGEST_SUFFIX)


def write_digest(path: Path, data: bytes | memoryview | None = None) -> Path:
    """Record the SHA-256 of `data` (else of the file at `path`) beside `path`."""
    digest = hashlib.sha256(data).hexdigest() if data is not None else _file_sha256(path)
    target = digest_path(path)
    target.write_text(digest + "\n")
    return target


def matches_digest(path: Path) -> bool:
    """Whether `path` has a recorded SHA-256 and its bytes still match it."""
    recorded = digest_path(path)
    if not path.is_file() or not recorded.is_file():
        return False
    return recorded.read_text().strip() == _file_sha256(path)


def key_parts_path(path: Path) -> Path:
    """Where the key parts of the artifact at `path` are recorded (`<name>.json`, a companion of `path`)."""
    return path.with_name(path.name + KEY_PARTS_SUFFIX)


def write_key_parts(path: Path, parts: CacheKeyParts) -> Path:
    """Record `parts` beside the artifact at `path`, so `python -m engine.doctor` can say what it was built for."""
    target = key_parts_path(path)
    target.write_text(json.dumps(asdict(parts), indent=1, sort_keys=True) + "\n")
    return target


def read_key_parts(path: Path) -> CacheKeyParts:
    """The key parts recorded beside the artifact at `path`.

    Raises:
        FileNotFoundError: none are recorded (the artifact was written before key parts were).
        ValueError: the record is not JSON or not the fields of `CacheKeyParts`.
    """
    text = key_parts_path(path).read_text()
    try:
        data = json.loads(text)
        if isinstance(data.get("resolution_range"), list):
            data["resolution_range"] = tuple(data["resolution_range"])
        if isinstance(data.get("loras"), list):
            data["loras"] = tuple(data["loras"])
        return CacheKeyParts(**data)
    except (json.JSONDecodeError, TypeError, AttributeError) as error:
        raise ValueError(f"{key_parts_path(path).name} does not hold cache key parts: {error}") from error


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def unloadable_file_error(path: Path, reason: str) -> Exception:
    """The error for a cached file its loader could not parse, deciding whether it may be deleted.

    A file that matches its recorded digest is intact: the failure lies elsewhere (out of GPU
    memory while deserialising, a runtime that cannot run it), so it is kept and the error says so.
    Without a matching digest it is treated as corrupt (`CorruptArtifactError`): delete and rebuild.
    """
    if matches_digest(path):
        return RuntimeError(f"{path.name} could not be loaded although it is intact (it matches its recorded "
                            f"SHA-256), so it was kept: {reason}. Delete it to force a rebuild.")
    return CorruptArtifactError(f"{path.name} is unreadable: {reason}")


def _remove_artifact(path: Path) -> None:
    """Delete `path` and its companions `<name>.*` (an ONNX file's weights `<name>.data`, a digest)."""
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


def mark_used(path: Path) -> None:
    """Record that `path` was just used (its modification time), which `evict_least_recently_used` goes by."""
    try:
        os.utime(path)
    except OSError as error:  # a read-only cache folder is no reason to fail a load
        logger.debug("could not mark %s as used: %s", path.name, error)


def evict_least_recently_used(folder: Path, max_bytes: int, keep: set[Path], suffix: str = ".engine") -> list[Path]:
    """Delete the least recently used `*<suffix>` artifacts of `folder` (with their companions) until they take at
    most `max_bytes`, never one of `keep` (those open now); returns the deleted artifacts, oldest first."""
    artifacts = sorted(folder.glob(f"*{suffix}"), key=lambda path: path.stat().st_mtime)

    def size(path: Path) -> int:
        return path.stat().st_size + sum(companion.stat().st_size for companion in path.parent.glob(f"{path.name}.*"))

    total = sum(size(path) for path in artifacts)
    removed = []
    for path in artifacts:
        if total <= max_bytes:
            break
        if path in keep:
            continue
        freed = size(path)
        _remove_artifact(path)
        total -= freed
        removed.append(path)
        logger.info("evicted %s (%.0f MB, least recently used) to keep the cache under %.1f GB", path.name,
                    freed / 1e6, max_bytes / 1e9)
    return removed


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Hold the cache's lock on `path` for as long as the block runs: two processes sharing a cache folder (two
    replicas on one `trt_cache/`) never build the same artifact at once. An OS file lock (`flock` on
    `.locks/<name>.lock` in the cache folder), so a process that dies releases it."""
    locks = path.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{path.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another process is building %s; waiting for it", path.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_artifact(path: Path, build: Callable[[Path], None], load: Callable[[Path], T],
                    key_parts: CacheKeyParts | None = None) -> T:
    """Load `path`, building it first when it is missing; a corrupt file is deleted and rebuilt once.

    `build(temporary_path)` writes the artifact. `load(path)` raises `CorruptArtifactError` when the
    file itself is unreadable (truncated, garbage, missing companion); only then is it deleted and
    rebuilt. Any other error (out of memory, a device or dtype the runtime refuses) propagates and
    the file stays: a rebuild takes minutes and would fail the same way. `key_parts` (the parts of
    `path`'s key) are recorded beside the artifact when it is built, or when a file cached before
    key parts were recorded loads. Building holds `build_lock`, and a process that waited for another's build
    loads what it built.
    """
    loaded = _load_cached(path, load, key_parts)
    if loaded is not _MISSING:
        return loaded
    with build_lock(path):
        loaded = _load_cached(path, load, key_parts)
        if loaded is not _MISSING:  # built by another process while this one waited
            return loaded
        logger.info("building %s", path)

        def build_with_key_parts(temporary: Path) -> None:
            build(temporary)
            if key_parts is not None:
                write_key_parts(temporary, key_parts)

        atomic_write(path, build_with_key_parts)
    return load(path)


#: What `_load_cached` returns when there is nothing to load.
_MISSING = object()


def _load_cached(path: Path, load: Callable[[Path], T], key_parts: CacheKeyParts | None) -> T | object:
    """`load(path)` when the file is there; `_MISSING` when it is not, or was corrupt (and is deleted now)."""
    if not path.is_file():
        return _MISSING
    try:
        loaded = load(path)
    except CorruptArtifactError as error:
        logger.warning("cached %s is unreadable (%s); deleting and rebuilding it", path.name, error)
        _remove_artifact(path)
        return _MISSING
    except Exception as error:
        logger.error("loading cached %s failed (%s: %s); the file was kept, it is not a corrupt file",
                     path.name, type(error).__name__, error)
        raise
    if key_parts is not None and not key_parts_path(path).is_file():
        _record_key_parts_of_old_file(path, key_parts)
    return loaded


def _record_key_parts_of_old_file(path: Path, key_parts: CacheKeyParts) -> None:
    # Only a file whose key is `key_parts`' was looked up and loaded, so they are its parts; a read-only
    # cache folder is no reason to fail a load.
    try:
        write_key_parts(path, key_parts)
    except OSError as error:
        logger.debug("could not record the key parts of %s: %s", path.name, error)
