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
from .flags import add_flags, configs_from, engine_flags
from .loading import load_bundle
from .models import ModelLoadError

logger = logging.getLogger("engine.build")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.build", description=__doc__.split("\n\n")[0])
    # The engine's own flags (`engine.flags`), as the server spells them; the backend defaults to `auto` here.
    add_flags(parser, engine_flags("load", "stream", exclude=("memory", "prompt", "negative_prompt", "seed",
                                                              "similarity_filter", "skip_policy", "guidance_scale")))
    parser.set_defaults(backend="auto")
    parser.add_argument("--exporter", choices=EXPORTERS, default=DEFAULT_EXPORTER)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache folder (default: $STREAMDIFF_TRT_CACHE or {default_cache_dir()})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build every graph of the given configuration; 0 on success, 2 when the backend cannot run here."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        load, stream, _ = configs_from(vars(args))
        models = load_bundle(load)
    except (ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        backend = resolve_backend(load.backend, models)
        if backend not in ("onnxruntime", "tensorrt"):
            print(f"error: backend {backend!r} has nothing to prebuild (needs onnxruntime or tensorrt)",
                  file=sys.stderr)
            return 2
        runner = new_runner(backend, models, stream.cfg_type, args.cache_dir, args.exporter, load.resolution_range,
                            load.trt_cache_max_gb)
        paths = runner.prepare(stream, load.kv_cache)
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
