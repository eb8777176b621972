"""Prebuild the compiled graphs of one deployment: `python -m engine.build --model tiny --width 512 ...`.

Exports the UNet, VAE encoder and VAE decoder to ONNX (and builds TensorRT engines with
`--backend tensorrt`) into the cache folder, so a server started later with the same model, size,
guidance mode and batch opens them at once instead of compiling on its first stream.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .backends import BackendUnavailableError, resolve_backend
from .backends.cache import default_cache_dir
from .backends.factory import new_runner
from .backends.onnx_export import DEFAULT_EXPORTER, EXPORTERS
from .backends.resolution import RESOLUTION_RANGE_ENV, parse_resolution_range, resolution_range_from_env
from .config import CFG_TYPES, EngineConfig
from .loading import load_bundle
from .models import ModelLoadError

logger = logging.getLogger("engine.build")


def _resolution_range_argument(text: str):
    try:
        return parse_resolution_range(text)
    except ValueError as error:  # argparse prints an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(error)) from error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = EngineConfig()
    parser = argparse.ArgumentParser(prog="python -m engine.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=defaults.model, help="model spec (tiny, small, folder, file, hub id)")
    parser.add_argument("--taesd", default=None, help="tiny VAE (TAESD) folder or hub id")
    parser.add_argument("--vae", choices=("tiny", "full"), default="tiny", help="which VAE the graphs use")
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--t-index-list", type=int, nargs="+", default=list(defaults.t_index_list))
    parser.add_argument("--cfg-type", choices=CFG_TYPES, default=defaults.cfg_type)
    parser.add_argument("--frame-buffer-size", type=int, default=defaults.frame_buffer_size)
    parser.add_argument("--no-kv-cache", action="store_true", help="graphs that take text embeddings instead of K/V")
    parser.add_argument("--backend", choices=("onnxruntime", "tensorrt", "auto"), default="auto",
                        help="what to prebuild: ONNX graphs (onnxruntime) or also TensorRT engines (tensorrt)")
    parser.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER)
    parser.add_argument("--resolution-range", type=_resolution_range_argument, default=None, metavar="MIN-MAX[:OPT]",
                        help="dynamic-shape graphs serving every size of this range, e.g. 256-1024 (opt 512); "
                             f"default ${RESOLUTION_RANGE_ENV} or static graphs of --width x --height")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache folder (default: $STREAMDIFF_TRT_CACHE or {default_cache_dir()})")
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", default=defaults.dtype)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build every graph of the given configuration; 0 on success, 2 when the backend cannot run here."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = EngineConfig(model=args.model, width=args.width, height=args.height,
                              t_index_list=tuple(args.t_index_list), cfg_type=args.cfg_type,
                              frame_buffer_size=args.frame_buffer_size, use_kv_cache=not args.no_kv_cache,
                              use_tiny_vae=args.vae == "tiny", taesd=args.taesd, backend=args.backend,
                              device=args.device, dtype=args.dtype)
        models = load_bundle(config)
    except (ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        backend = resolve_backend(config.backend, models)
        if backend not in ("onnxruntime", "tensorrt"):
            print(f"error: backend {backend!r} has nothing to prebuild (needs onnxruntime or tensorrt)",
                  file=sys.stderr)
            return 2
        resolution_range = args.resolution_range or resolution_range_from_env()
        runner = new_runner(backend, models, config.cfg_type, args.cache_dir, args.exporter, resolution_range)
        paths = runner.prepare(config)
    except (BackendUnavailableError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        size = sum(part.stat().st_size for part in path.parent.glob(f"{path.name}*"))
        print(f"{path}  ({size / 1e6:.1f} MB)")
    print(f"{backend}: {len(paths)} graphs ready in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
