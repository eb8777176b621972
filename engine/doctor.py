"""`python -m engine.doctor`: what this machine can run, and a few frames end to end on the backend it picks.

Prints the versions of torch, CUDA, cuDNN, TensorRT, ONNX Runtime (with its execution providers) and
diffusers; the GPUs with their memory; which backend `--backend auto` picks and why; every entry of
the engine cache (what it was built for, its size, whether it is stale or unreadable); then runs a few
frames through a stream on the chosen backend (the built-in tiny model unless `--model` names
another) and prints their fps. Every missing piece is named with the command that fixes it.

Exit status: 0 only when the chosen backend ran the frames (finite images of the right shape); 1 when
it did not; 2 for bad arguments. `--json FILE` writes the whole report as JSON.

Every decision is a plain function of what was probed (`environment_checks`, `entry_status`,
`failure_fix`, `exit_code`), tested without a GPU; only `probe_*`, `scan_cache` and `run_frames` touch
the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends.auto import Measurement, describe, read_verdicts
from .backends.cache import (
    CacheKeyParts,
    CorruptArtifactError,
    default_cache_dir,
    digest_path,
    engine_cache_key,
    matches_digest,
    read_key_parts,
    tensorrt_version,
)
from .backends.errors import BackendUnavailableError
from .backends.factory import Availability, choose_backend, probe_availability, unavailable_reason
from .backends.onnx_export import DEFAULT_EXPORTER, EXPORTERS
from .backends.tensorrt import tensorrt_install
from .config import BACKENDS
from .loading import resolve_device, resolve_dtype
from .models import ModelLoadError

logger = logging.getLogger("engine.doctor")

OK, MISSING, INFO = "ok", "missing", "info"
# The CUDA build of torch comes from PyTorch's own index; the suffix is the CUDA version the driver supports.
TORCH_CUDA_INSTALL = ("pip install --force-reinstall torch --index-url https://download.pytorch.org/whl/cu128 "
                      "(cu126/cu128/cu130: the CUDA version `nvidia-smi` shows the driver supports)")
ONNX_INSTALL = "pip install -e '.[onnx]'"
ARTIFACT_SUFFIXES = (".onnx", ".engine")


@dataclass
class Check:
    """One line of the environment report: a piece, its state, what was found, and the command that fixes it."""

    name: str
    status: str
    detail: str
    fix: str | None = None


# ---------------------------------------------------------------------------------------------- probing


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe_versions() -> dict:
    """Versions of everything the backends need (None where a piece is not installed)."""
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # a CPU build or a broken cuDNN raises instead of answering None
        cudnn = None
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except Exception:  # a broken install is reported by the checks, not raised
        providers = None
    trt = tensorrt_version()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": cudnn,
        "tensorrt": None if trt == "none" else trt,
        "polygraphy": _version("polygraphy"),
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnxruntime_providers": providers,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
    }


def probe_gpus() -> list[dict]:
    """Every CUDA GPU torch sees: index, name, compute capability, total and free memory in GiB."""
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        gpus.append({"index": index, "name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                     "total_gib": round(total / 2**30, 2), "free_gib": round(free / 2**30, 2)})
    return gpus


# ---------------------------------------------------------------------------------------------- decisions


def environment_checks(versions: dict, gpus: Sequence[dict], available: Availability) -> list[Check]:
    """The environment report, one `Check` per piece, each missing one with the command that fixes it."""
    checks = [Check("torch", OK, f"{versions['torch']} (CUDA build: {versions['torch_cuda'] or 'none, CPU only'})")]
    if versions["cuda_available"]:
        names = ", ".join(f"{gpu['name']} ({gpu['total_gib']:.1f} GiB)" for gpu in gpus)
        checks.append(Check("CUDA", OK, f"{versions['torch_cuda']}: {names}"))
    elif versions["torch_cuda"]:
        checks.append(Check("CUDA", MISSING, f"torch is a CUDA {versions['torch_cuda']} build but sees no GPU",
                            "check the NVIDIA driver with `nvidia-smi` and that CUDA_VISIBLE_DEVICES names a GPU"))
    else:
        checks.append(Check("CUDA", MISSING, "torch sees no CUDA GPU (a CPU-only torch): fine for CPU serving",
                            f"on a machine with an NVIDIA GPU and driver: {TORCH_CUDA_INSTALL}"))
    if versions["cudnn"] is not None:
        checks.append(Check("cuDNN", OK, str(versions["cudnn"])))
    else:
        checks.append(Check("cuDNN", MISSING, "not available (it comes with torch's CUDA build)",
                            None if not versions["cuda_available"] else TORCH_CUDA_INSTALL))
    trt_reason = unavailable_reason("tensorrt", available)
    if trt_reason is None:
        checks.append(Check("TensorRT", OK, f"{versions['tensorrt']} (polygraphy {versions['polygraphy']})"))
    else:
        if not versions["cuda_available"]:
            fix = f"on a CUDA machine: {tensorrt_install(versions['torch_cuda'])}"
        else:
            # An installed TensorRT that cannot run is a broken or mismatched install.
            fix = tensorrt_install(versions["torch_cuda"], reinstall=versions["tensorrt"] is not None)
        checks.append(Check("TensorRT", MISSING, trt_reason, fix))
    providers = ", ".join(available.onnxruntime_providers or ())
    ort_reason = unavailable_reason("onnxruntime", available)
    if available.onnxruntime_providers is None:
        checks.append(Check("ONNX Runtime", MISSING, ort_reason, ONNX_INSTALL))
    elif ort_reason is not None:
        fix = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" if "CUDA" in ort_reason else None
        checks.append(Check("ONNX Runtime", MISSING, f"{versions['onnxruntime']} [{providers}]: {ort_reason}", fix))
    else:
        checks.append(Check("ONNX Runtime", OK, f"{versions['onnxruntime']} [{providers}]"))
    if versions["onnx"] is None or versions["onnxscript"] is None:
        checks.append(Check("ONNX export", MISSING, "onnx and onnxscript export the graphs ONNX Runtime and TensorRT "
                            "run", ONNX_INSTALL))
    else:
        checks.append(Check("ONNX export", OK, f"onnx {versions['onnx']}, onnxscript {versions['onnxscript']}"))
    checks.append(Check("diffusers", OK if versions["diffusers"] else MISSING, str(versions["diffusers"]),
                        None if versions["diffusers"] else "pip install -e ."))
    return checks


def entry_status(name: str, parts: CacheKeyParts | None, problem: str | None, installed_tensorrt: str,
                 gpu_names: Sequence[str]) -> tuple[str, str]:
    """(status, note) of cache file `name` (`<key>.onnx` or `<key>.engine`) from what was read of it.

    `ok`: this machine loads it when a stream asks for its key. `unreadable`: damaged (`problem`), it
    would be deleted and rebuilt. `stale`: never loaded here (its key scheme changed, or an engine of
    another TensorRT version or GPU). `unknown`: no key parts recorded (cached before they were).
    """
    if problem is not None:
        return "unreadable", problem
    if parts is None:
        return "unknown", "no key parts recorded (cached before they were); it is still used when its key matches"
    key, _, suffix = name.rpartition(".")
    if engine_cache_key(parts) != key:
        return "stale", "its parts no longer give its name (the key changed since it was built): never loaded again"
    if suffix == "engine":
        if parts.tensorrt_version != installed_tensorrt:
            return "stale", f"built with TensorRT {parts.tensorrt_version}, this machine has {installed_tensorrt}"
        if parts.gpu_name not in gpu_names:
            return "stale", f"built for {parts.gpu_name}, this machine has {', '.join(gpu_names) or 'no GPU'}"
    return "ok", ""


def describe_parts(parts: CacheKeyParts) -> str:
    """One line of an entry's key parts, for people."""
    size = f"{parts.width}x{parts.height}" if parts.resolution_range is None else \
        f"{parts.resolution_range[0]}-{parts.resolution_range[2]} (opt {parts.resolution_range[1]})"
    inputs = (" K/V inputs" if parts.kv_cache else " text inputs") if parts.network == "unet" else ""
    if parts.control_residuals:
        inputs += " + ControlNet residuals"
    if parts.attention_bank:
        inputs += f" + attention bank of {parts.attention_bank}"
    text = (f"{parts.network} {size} batch {parts.batch} {parts.cfg_type} {parts.dtype}{inputs}, "
            f"{parts.exporter} opset {parts.opset}, model {parts.model_hash[:12]}")
    if parts.loras:
        text += f", LoRA {' + '.join(parts.loras)}"
    if parts.tensorrt_version != "none":
        text += f", TensorRT {parts.tensorrt_version} on {parts.gpu_name}"
    return text


def failure_fix(backend: str, error: BaseException, available: Availability, torch_cuda: str | None) -> str:
    """The command that fixes (or works around) a chosen path that failed with `error`."""
    if isinstance(error, ModelLoadError):
        return "use the built-in model (--model tiny, offline), or check the hub (network, HF_HUB_OFFLINE, HF_TOKEN)"
    reason = unavailable_reason(backend, available) if backend in BACKENDS and backend != "auto" else None
    if reason is not None or isinstance(error, BackendUnavailableError):
        if backend == "tensorrt":
            return f"{tensorrt_install(torch_cuda)} on a CUDA machine, or --backend onnxruntime / eager"
        if backend == "onnxruntime":
            return f"{ONNX_INSTALL} (onnxruntime-gpu for CUDA models), or --backend eager"
    reinstall = {"onnxruntime": "pip install --force-reinstall -e '.[onnx]'",
                 "tensorrt": tensorrt_install(torch_cuda, reinstall=True),
                 "compile": "a C++ compiler for Inductor (apt-get install g++)",
                 "eager": "pip install --force-reinstall -e ."}.get(backend, "pip install --force-reinstall -e .")
    other = "" if backend == "eager" else "; to serve meanwhile: --backend eager"
    return f"{reinstall}, then rerun python -m engine.doctor --backend {backend}{other}"


def exit_code(run: dict | None) -> int:
    """0 when the chosen backend ran its frames, else 1."""
    return 0 if run is not None and run.get("ok") else 1


# ---------------------------------------------------------------------------------------------- the cache


@dataclass
class CacheEntry:
    """One file (or leftover folder) of the engine cache."""

    name: str
    kind: str
    bytes: int
    status: str
    note: str = ""
    parts: dict | None = None
    fix: str | None = None


def _companions(path: Path) -> list[Path]:
    return [item for item in path.parent.iterdir() if item.name.startswith(path.name + ".")]


def _integrity_problem(path: Path) -> str | None:
    """Why the artifact at `path` is damaged, or None (an ONNX graph is checked by path, an engine by digest)."""
    if path.suffix == ".onnx":
        try:
            from .backends.artifacts import check_onnx_file

            check_onnx_file(path)
        except CorruptArtifactError as error:
            return str(error)
        except ImportError:  # without onnx the graph cannot be checked; ONNX Runtime would not run it either
            return None
    elif digest_path(path).is_file() and not matches_digest(path):
        return "does not match its recorded SHA-256 (damaged)"
    return None


def scan_cache(folder: Path, installed_tensorrt: str, gpu_names: Sequence[str]) -> list[CacheEntry]:
    """Every entry of the cache folder: graphs and engines with their key parts and status, timing caches,
    and what a crash or an older version left behind."""
    if not folder.is_dir():
        return []
    entries = []
    artifacts = {path.name for path in folder.iterdir() if path.suffix in ARTIFACT_SUFFIXES and path.is_file()}
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            if path.name.startswith(".") and (path.name.endswith(".partial") or path.name.startswith(".export-")):
                size = sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
                entries.append(CacheEntry(path.name, "leftover", size, "stale",
                                          note="an interrupted export or build left it", fix=f"rm -r '{path}'"))
            continue
        if path.name in artifacts:
            parts, note = None, ""
            try:
                parts = read_key_parts(path)
            except FileNotFoundError:
                pass
            except (ValueError, OSError) as error:
                note = f"{error}; "
            status, why = entry_status(path.name, parts, _integrity_problem(path), installed_tensorrt, gpu_names)
            size = path.stat().st_size + sum(item.stat().st_size for item in _companions(path))
            fix = None if status in ("ok", "unknown") else f"rm '{path}'*"
            entries.append(CacheEntry(path.name, path.suffix.lstrip("."), size, status, note=note + why,
                                      parts=dataclasses.asdict(parts) if parts is not None else None, fix=fix))
        elif path.name.startswith("timing-") and path.suffix == ".cache":
            entries.append(CacheEntry(path.name, "timing cache", path.stat().st_size, INFO,
                                      note="TensorRT tactic timings of one GPU model and TensorRT version"))
        elif any(f"{suffix}." in path.name for suffix in ARTIFACT_SUFFIXES) \
                and not any(path.name.startswith(artifact + ".") for artifact in artifacts):
            entries.append(CacheEntry(path.name, "orphan", path.stat().st_size, "stale",
                                      note="a companion whose graph or engine is gone", fix=f"rm '{path}'"))
    return entries


# ---------------------------------------------------------------------------------------------- frames


def moving_frames(count: int, size: int) -> list[torch.Tensor]:
    """`count` frames `[3, size, size]` in [0, 1]: a gradient drifting a little each frame (no two alike)."""
    axis = torch.linspace(0.0, 1.0, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return [torch.stack([(x + index / (4 * count)) % 1.0, y, (x + y) / 2]) for index in range(count)]


def run_frames(model: str, backend: str, size: int, frames: int, warmup: int, device: str, dtype: str,
               cache_dir: Path, exporter: str) -> dict:
    """Load `model`, open a stream on `backend` and time `frames` frames after `warmup`: the doctor's end to end.

    The one place the doctor builds an engine configuration and a stream.
    """
    from .backends.base import runner_name
    from .backends.factory import make_runner
    from .config import LoadConfig, StreamConfig
    from .loading import Engine, load_bundle
    from .stream import StreamEngine

    load = LoadConfig(model=model, backend=backend, device=device, dtype=dtype)
    config = StreamConfig(width=size, height=size, similarity_filter=False)
    started = time.perf_counter()
    models = load_bundle(load)
    loaded = time.perf_counter()
    runner = make_runner(models, load, config, cache_dir, exporter)
    engine = StreamEngine(Engine.prepare(models, load).with_runner(runner), config)
    opened = time.perf_counter()
    clip = moving_frames(warmup + frames, size)
    seconds, output = [], None
    for index, frame in enumerate(clip):
        begun = time.perf_counter()
        output = engine(frame)
        if output.is_cuda:
            torch.cuda.synchronize(output.device)
        if index >= warmup:
            seconds.append(time.perf_counter() - begun)
    finite = output is not None and bool(torch.isfinite(output).all())
    shape_ok = output is not None and tuple(output.shape) == (3, size, size)
    return {
        "ok": finite and shape_ok, "backend": runner_name(engine.runner), "model": model, "size": size,
        "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."), "frames": frames,
        "threads": torch.get_num_threads(),
        "load_s": round(loaded - started, 2), "open_s": round(opened - loaded, 2),
        "fps": round(1.0 / statistics.median(seconds), 2) if seconds else None,
        "output_finite": finite, "output_shape": list(output.shape) if output is not None else None,
    }


# ---------------------------------------------------------------------------------------------- report


@dataclass
class Report:
    """Everything the doctor found; `--json` writes it as is."""

    versions: dict
    gpus: list[dict]
    checks: list[Check]
    backend: dict
    cache: dict
    run: dict | None = None
    failure: dict | None = None
    exit_code: int = 1
    fixes: list[str] = field(default_factory=list)


def format_report(report: Report) -> str:
    """The report for people: one aligned line per piece, each missing piece followed by its fix."""
    lines = ["streamdiff doctor", "", "environment"]
    for check in report.checks:
        lines.append(f"  {check.name:<13} {check.status:<8} {check.detail}")
        if check.fix and check.status != OK:
            lines.append(f"  {'':<13} {'':<8} fix: {check.fix}")
    lines.append(f"  {'GPUs':<13} {'':<8} " + ("none" if not report.gpus else "; ".join(
        f"cuda:{gpu['index']} {gpu['name']} (sm {gpu['capability']}), {gpu['free_gib']:.1f} of "
        f"{gpu['total_gib']:.1f} GiB free" for gpu in report.gpus)))
    backend = report.backend
    lines += ["", f"backend: --backend {backend['requested']} -> {backend['chosen']} ({backend['reason']})"]
    for name, reason in backend["available"].items():
        lines.append(f"  {name:<13} {'runs here' if reason is None else 'cannot run: ' + reason}")
    verdicts = backend.get("auto_verdicts", [])
    lines.append("  an engine's --backend auto times the backends that run here on its stream and takes the fastest; "
                 + (f"measured here ({len(verdicts)}):" if verdicts else "nothing measured here yet"))
    for verdict in verdicts:
        lines.append(f"    {verdict['size']} {verdict['cfg_type']} {verdict['dtype']} on {verdict['device']}, "
                     f"{verdict['threads']} thread(s) -> {verdict['chosen']}: {verdict['figures']}")
    cache = report.cache
    lines += ["", f"engine cache: {cache['folder']} ({len(cache['entries'])} entries, {cache['bytes'] / 1e6:.1f} MB)"]
    for entry in cache["entries"]:
        what = describe_parts(CacheKeyParts(**{**entry["parts"], "resolution_range": _tuple(entry["parts"])})) \
            if entry["parts"] else entry["kind"]
        lines.append(f"  {entry['status']:<10} {entry['name']}  {entry['bytes'] / 1e6:.1f} MB  {what}")
        if entry["note"]:
            lines.append(f"  {'':<10} {entry['note']}")
        if entry["fix"]:
            lines.append(f"  {'':<10} fix: {entry['fix']}")
    lines.append("")
    if report.run is not None:
        run = report.run
        lines.append(f"frames: {run['backend']} on {run['device']} ({run['dtype']}, torch threads: {run['threads']}), "
                     f"model {run['model']}, {run['size']}x{run['size']}: {run['fps']} fps (median of {run['frames']} "
                     f"frames; model loaded in {run['load_s']} s, graphs opened in {run['open_s']} s)")
        if not run["ok"]:
            lines.append(f"  the output is wrong: finite {run['output_finite']}, shape {run['output_shape']}")
    if report.failure is not None:
        lines.append(f"frames: FAILED on {report.failure['backend']}: {report.failure['error']}")
        lines.append(f"  fix: {report.failure['fix']}")
    verdict = "works" if report.exit_code == 0 else "does NOT work"
    lines.append(f"result: the {backend['chosen']} path {verdict} here (exit {report.exit_code})")
    return "\n".join(lines)


def _tuple(parts: dict):
    value = parts.get("resolution_range")
    return tuple(value) if value is not None else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="the backend to check (default auto)")
    parser.add_argument("--model", default="tiny", help="model to run (default: the built-in tiny model, offline)")
    parser.add_argument("--size", type=int, default=128, help="square frame size of the test stream")
    parser.add_argument("--frames", type=int, default=10, help="timed frames (median fps)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames first")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), float32, float16, bfloat16")
    parser.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER, help="ONNX exporter")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"engine cache folder (default: $STREAMDIFF_TRT_CACHE or {default_cache_dir()})")
    parser.add_argument("--json", type=Path, help="also write the report to this JSON file")
    return parser.parse_args(argv)


def diagnose(args: argparse.Namespace) -> Report:
    """Probe, decide, scan the cache and run the frames; the whole report."""
    versions, gpus = probe_versions(), probe_gpus()
    device = resolve_device(args.device)
    dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    available = probe_availability(device, dtype)
    checks = environment_checks(versions, gpus, available)
    choice = choose_backend(args.backend, available)
    backend = {"requested": args.backend, "chosen": choice.backend, "reason": choice.reason,
               "device": str(device), "dtype": dtype,
               "available": {name: unavailable_reason(name, available) for name in ("tensorrt", "onnxruntime",
                                                                                    "eager")}}
    folder = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    # What a server's `auto` measured here (engine.backends.auto); the doctor itself runs the unmeasured rule.
    backend["auto_verdicts"] = [{"size": f"{entry['key']['width']}x{entry['key']['height']}",
                                 "cfg_type": entry["key"]["cfg_type"], "dtype": entry["key"]["dtype"],
                                 "device": entry["key"]["device"], "threads": entry["key"]["threads"],
                                 "chosen": entry["chosen"], "measured_at": entry.get("measured_at"),
                                 "figures": describe(tuple(Measurement(**item) for item in entry["measurements"]))}
                                for entry in read_verdicts(folder)]
    logger.info("running %d frames on %s (%s, %s)", args.warmup + args.frames, choice.backend, device, dtype)
    run, failure = None, None
    try:
        run = run_frames(args.model, choice.backend, args.size, args.frames, args.warmup, args.device, args.dtype,
                         folder, args.exporter)
    except Exception as error:  # every failure of the chosen path is reported with its fix, never raised
        logger.warning("the %s path failed", choice.backend, exc_info=True)
        failure = {"backend": choice.backend, "error": f"{type(error).__name__}: {error}",
                   "fix": failure_fix(choice.backend, error, available, versions["torch_cuda"])}
    # Scanned after the run, so the report also lists what the run exported or built.
    entries = scan_cache(folder, tensorrt_version(), [gpu["name"] for gpu in gpus])
    cache = {"folder": str(folder), "bytes": sum(entry.bytes for entry in entries),
             "entries": [dataclasses.asdict(entry) for entry in entries]}
    report = Report(versions, gpus, checks, backend, cache, run, failure, exit_code(run))
    report.fixes = [check.fix for check in checks if check.status != OK and check.fix]
    report.fixes += [entry.fix for entry in entries if entry.fix]
    if report.failure is not None:
        report.fixes.append(report.failure["fix"])
    return report


def main(argv: list[str] | None = None) -> int:
    """Print the report (and write `--json`); 0 only when the chosen backend ran its frames."""
    args = parse_args(argv)
    # Progress of long work (an ONNX export, an engine build) goes to stderr; the report to stdout.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = diagnose(args)
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dataclasses.asdict(report), indent=2, default=str))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
