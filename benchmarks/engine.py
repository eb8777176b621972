"""`python -m benchmarks.engine`: frames per second of the engine against its baselines.

Every row runs in this one process on the same model, size and seed; each figure is the median over
`--frames` frames after a warm-up. fps = output frames per second.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from engine import guidance
from engine.backends.onnxruntime import default_intra_op_threads, ort_threading
from engine.config import BACKENDS, StreamConfig
from engine.loading import Engine
from engine.stream import StreamEngine

from . import controlnet, memory, skip
from .clips import tensor_clip
from .report import start_logging, write_json
from .timing import median_fps, time_stream
from .workload import bench_load, bench_stream

logger = logging.getLogger(__name__)


def synchronized(step: Callable, device: torch.device) -> Callable:
    """`step` followed by a wait for `device`'s queued work: CUDA calls return before their kernels finish, so
    a frame's time must include that wait (nothing to wait for on a CPU)."""
    if device.type != "cuda":
        return step

    def run(item):
        output = step(item)
        torch.cuda.synchronize(device)
        return output

    return run


def engine_fps(engine: Engine, config: StreamConfig, clip: list[torch.Tensor], frames: int, warmup: int) -> float:
    """Output fps of a `StreamEngine` on a moving clip."""
    return median_fps(time_stream(synchronized(StreamEngine(engine, config), engine.device), clip, frames, warmup))


@torch.no_grad()
def compute_limit_fps(engine: Engine, config: StreamConfig, frames: int, warmup: int) -> float:
    """1 / the summed time of the bare forward passes one frame needs: one batched UNet call, VAE encode
    and VAE decode, each timed alone."""
    stream = StreamEngine(engine, config)
    runner, n = stream.runner, config.denoising_steps
    conditioning = next(iter(stream._prompt.layouts.values()))
    rows = guidance.unet_batch_size(config.cfg_type, n, config.frame_buffer_size)
    device, dtype = engine.device, engine.dtype
    latents = torch.randn(rows, *stream.latent_shape(config)).to(device, dtype)
    timesteps = torch.full((rows,), 500, dtype=torch.long, device=device)
    image = (torch.rand(1, 3, config.height, config.width) * 2 - 1).to(device, dtype)
    unet = statistics.median(time_stream(synchronized(lambda x: runner.unet(x, timesteps, conditioning), device),
                                         [latents], frames, warmup))
    encode = statistics.median(time_stream(synchronized(runner.encode, device), [image], frames, warmup))
    decode = statistics.median(time_stream(synchronized(runner.decode, device), [latents[:1]], frames, warmup))
    return 1.0 / (unet + encode + decode)


def diffusers_fps(engine: Engine, config: StreamConfig, clip: list[torch.Tensor], frames: int,
                  warmup: int) -> float:
    """diffusers `AutoPipelineForImage2Image` on the same model folder (SD or SDXL img2img): 4 steps, its CFG at 1.2."""
    from diffusers import AutoPipelineForImage2Image

    models = engine.models
    # SD pipelines have a safety checker to turn off; SDXL's have none.
    extra = {"safety_checker": None, "requires_safety_checker": False} if models.family == "sd" else {}
    with tempfile.TemporaryDirectory() as folder:
        models.save_pretrained(folder)
        # The same tiny VAE as the engine, so the rows compare the denoising loops (and a model saved without a
        # full VAE, like `demo`, still makes a pipeline).
        pipe = AutoPipelineForImage2Image.from_pretrained(folder, vae=models.vae, **extra)
    parameter = next(models.unet.parameters())
    pipe.to(parameter.device, parameter.dtype)
    pipe.set_progress_bar_config(disable=True)
    steps = config.denoising_steps
    generator = torch.Generator().manual_seed(config.seed)

    def run(frame: torch.Tensor) -> None:
        pipe(prompt=config.prompt, negative_prompt=config.negative_prompt, image=frame[None],
             num_inference_steps=2 * steps, strength=0.5, guidance_scale=config.guidance_scale,
             generator=generator, output_type="pt")

    return median_fps(time_stream(synchronized(run, parameter.device), clip, frames, warmup))


def skip_rate(engine: Engine, config: StreamConfig, clip: list[torch.Tensor], count: int = 100) -> float:
    """Fraction of `count` identical frames the similarity filter skips."""
    stream = StreamEngine(engine, config.replace(similarity_filter=True))
    for _ in range(count):
        stream(clip[0])
    return stream.frames_skipped / count


def run(model: str = "tiny", size: int = 128, frames: int = 30, warmup: int = 5,
        backends: tuple[str, ...] = (), height: int | None = None, device: str = "cpu",
        dtype: str = "float32", controlnet_spec: str | None = None,
        controlnet_reuse_interval: int = controlnet.DEFAULT_REUSE_INTERVAL,
        controlnet_reuse_threshold: float | None = None) -> dict:
    """Every benchmark row; returns the JSON-ready dict. Each of `backends` (other than eager) adds
    `<backend>_fps`: the same engine row with its networks on that backend. Frames are `size` wide and
    `height` (default `size`) high. Every row runs on `device` in `dtype` (by default the CPU in fp32, where
    the diffusers baseline runs; `auto` is fp16 on CUDA). `controlnet_spec` adds `controlnet_fps` and
    `controlnet_reuse_fps` (`benchmarks.controlnet`; its ratios are taken against the engine in the same
    interleaved rounds, whose figure is `controlnet.engine_fps`)."""
    torch.manual_seed(0)
    height = size if height is None else height
    load, config = bench_load(model).replace(device=device, dtype=dtype), bench_stream(size, height)
    engine = Engine.load(load)
    clip = tensor_clip("slow_pan", 60, size, height)
    results: dict = {
        "model": model, "size": size, "width": size, "height": height, "frames": frames,
        "t_index_list": list(config.t_index_list),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": str(engine.device),
                    "dtype": str(engine.dtype).removeprefix("torch.")},
        # Per row: torch's intra-op threads and, where ONNX Runtime runs, its session threading.
        "threads": {},
    }
    if engine.device.type == "cuda":
        results["machine"]["gpu"] = torch.cuda.get_device_name(engine.device)
    rows: list[tuple[str, Callable[[], float]]] = [
        ("engine_fps", lambda: engine_fps(engine, config, clip, frames, warmup)),
        ("compute_limit_fps", lambda: compute_limit_fps(engine, config, frames, warmup)),
        ("sequential_fps", lambda: engine_fps(engine, config.replace(stream_batch=False), clip, frames, warmup)),
        ("full_cfg_fps", lambda: engine_fps(engine, config.replace(cfg_type="full"), clip, frames, warmup)),
        ("diffusers_fps", lambda: diffusers_fps(engine, config, clip, frames, warmup)),
        ("ssf_static_skip_rate", lambda: skip_rate(engine, config, clip)),
    ]
    budget = torch.get_num_threads()

    def backend_fps(backend: str) -> float:
        # Compiling (ONNX export, engine build) happens when the engine is made, before the warm-up; `auto`
        # measures its candidates then. The engine sets the thread split it serves with (ONNX Runtime on the
        # CPU: torch 1 thread, ONNX Runtime the budget); the next row starts from the budget again.
        torch.set_num_threads(budget)
        prepared = Engine.prepare(engine.models, load.replace(backend=backend), config)
        concrete = prepared.config.backend
        if backend == "auto":
            results["auto_backend"] = concrete
        threads = {"torch": torch.get_num_threads()}
        if "onnxruntime" in (concrete, prepared.config.vae_backend):
            threads["onnxruntime"] = ort_threading(default_intra_op_threads()).as_dict()
        results["threads"][f"{backend}_fps"] = threads
        try:
            return engine_fps(prepared, config, clip, frames, warmup)
        finally:
            torch.set_num_threads(budget)

    rows += [(f"{backend}_fps", lambda backend=backend: backend_fps(backend))
             for backend in backends if backend != "eager"]
    for key, measure in rows:
        logger.info("measuring %s", key)
        results["threads"].setdefault(key, {"torch": torch.get_num_threads()})
        results[key] = round(measure(), 4)
    engine = results["engine_fps"]
    results["ratios"] = {
        "engine_vs_compute_limit": round(engine / results["compute_limit_fps"], 3),
        "engine_vs_diffusers": round(engine / results["diffusers_fps"], 3),
        "engine_vs_sequential": round(engine / results["sequential_fps"], 3),
        "engine_vs_full_cfg": round(engine / results["full_cfg_fps"], 3),
    }
    for backend in backends:
        if backend != "eager":
            results["ratios"][f"{backend}_vs_engine"] = round(results[f"{backend}_fps"] / engine, 3)
    if controlnet_spec is not None:
        rows = controlnet.run(load, config, clip, frames, warmup, controlnet_spec, controlnet_reuse_interval,
                              controlnet_reuse_threshold)
        results["controlnet"] = rows
        for key in ("controlnet_fps", "controlnet_reuse_fps"):
            results[key] = rows[key]
        results["threads"]["controlnet_fps"] = results["threads"]["controlnet_reuse_fps"] = \
            {"torch": torch.get_num_threads()}
        results["ratios"].update(rows["ratios"])
    return results


def format_table(results: dict) -> str:
    """A plain-text table of the figures and ratios."""
    lines = [f"model={results['model']} size={results['width']}x{results['height']} "
             f"steps={len(results['t_index_list'])} frames={results['frames']} "
             f"threads={results['machine']['threads']}"]
    for key, value in results.items():
        if key.endswith(("_fps", "_rate")):
            threads = results.get("threads", {}).get(key, {})
            note = f"  torch {threads['torch']} thread(s)" if "torch" in threads else ""
            if "onnxruntime" in threads:
                note += f", ONNX Runtime {threads['onnxruntime']['intra_op_num_threads']} intra-op"
            if key == "auto_fps":
                note += f" ({results['auto_backend']})"
            lines.append(f"  {key:<24} {value:>10.3f}{note}")
    for key, value in results["ratios"].items():
        lines.append(f"  {key:<24} {value:>10.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Measure the fps rows (or `--skip` / `--memory` instead), print a table and optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__)
    parser.add_argument("--model", default="tiny", help="tiny (default), small (compute-bound), tiny-sdxl (SDXL's "
                                                        "architecture) or any model spec")
    parser.add_argument("--size", type=int, default=128, help="square frame size in pixels")
    parser.add_argument("--width", type=int, help="frame width in pixels (default: --size)")
    parser.add_argument("--height", type=int, help="frame height in pixels (default: --size)")
    parser.add_argument("--frames", type=int, default=30, help="measured frames per row (median)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured frames per row")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a busy "
                        "machine OpenMP threads that wait for a descheduled peer make 2 threads far slower than 1")
    parser.add_argument("--device", default="cpu", help="where every row runs: cpu (default), cuda, cuda:1, auto")
    parser.add_argument("--dtype", default="float32", help="float32 (default), float16, bfloat16, or auto (fp16 on "
                        "CUDA)")
    parser.add_argument("--backend", nargs="+", default=[], choices=BACKENDS,
                        help="also measure the engine on these backends (e.g. onnxruntime): adds <backend>_fps")
    parser.add_argument("--skip", help="instead of the fps rows: skip policies to measure, e.g. rehash,adacache "
                                       "(benchmarks/skip.py; --frames frames per clip category)")
    parser.add_argument("--skip-param", action="append", default=[], metavar="KEY=VALUE",
                        help="a skip-policy parameter for --skip, e.g. skip_cut_threshold=0.05")
    parser.add_argument("--memory", help="instead of the fps rows: peak memory and fps of these memory modes and "
                                         "off, e.g. slice,group, a fresh process each (benchmarks/memory.py)")
    parser.add_argument("--memory-model", default="small", help="model of --memory (default small)")
    parser.add_argument("--memory-sizes", default="512,1024", help="comma-separated square sizes of --memory")
    parser.add_argument("--controlnet", help="also the engine with this ControlNet (demo, random, a folder or hub id) "
                                             "on every frame and with reused residuals, against the engine without "
                                             "it in interleaved rounds: adds controlnet_fps, controlnet_reuse_fps "
                                             "(benchmarks/controlnet.py)")
    parser.add_argument("--controlnet-reuse-interval", type=int, default=controlnet.DEFAULT_REUSE_INTERVAL,
                        help="--controlnet's reuse row: residuals at most every this many frames")
    parser.add_argument("--controlnet-reuse-threshold", type=float,
                        help="--controlnet's reuse row: recompute when the control image moved more than this "
                             "(default: the stream default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start_logging()
    if args.memory:
        sizes = tuple(int(size) for size in args.memory_sizes.split(","))
        results = {"memory": memory.run(args.memory.split(","), args.memory_model, sizes)}
        print(memory.format_table(results["memory"]))
    elif args.skip:
        results = skip.run_policies(args.model, args.width or args.size, args.frames, args.skip.split(","),
                                    args.skip_param, height=args.height or args.size)
        print(skip.format_table(results["skip_policies"]))
    else:
        results = run(args.model, args.width or args.size, args.frames, args.warmup, tuple(args.backend),
                      height=args.height or args.size, device=args.device, dtype=args.dtype,
                      controlnet_spec=args.controlnet, controlnet_reuse_interval=args.controlnet_reuse_interval,
                      controlnet_reuse_threshold=args.controlnet_reuse_threshold)
        print(format_table(results))
        if args.controlnet:
            print(controlnet.format_table(results["controlnet"]))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
