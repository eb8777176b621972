"""`python -m benchmarks.streamdiffusion`: this engine with `--backend auto` against StreamDiffusion 0.1.1.

Both run in this one process on the same model (two copies of it: StreamDiffusion gets diffusers' own attention
processors, ours gets its K/V-cache processors), the same size, steps, guidance, prompt and seed, frame by frame
in turn (so a load change on a shared machine hits both alike), for each configuration:

- `rcfg_self_2step`: t_index_list 32,45, RCFG self-negative, guidance 1.2 (StreamDiffusion's default);
- `one_step`: t_index_list 32, RCFG self;
- `four_step`: t_index_list 0,16,32,45, RCFG self;
- `full_cfg`: t_index_list 32,45, full classifier-free guidance 1.2 (2n UNet rows).

StreamDiffusion's frame is its `StreamDiffusion.__call__` (preprocess, VAE encode, stream-batch UNet step,
VAE decode) with the similarity filter off. On a CPU its `__call__` cannot run as published: it times itself
with `torch.cuda.Event`, which a CPU-only torch refuses, so there the same body runs without those four timing
lines (`streamdiffusion_frame`); on CUDA `__call__` itself runs. Ours is `StreamEngine.__call__` on an engine
prepared with `backend="auto"` on that configuration's workload (the choice and its figures are logged and
reported). fps = frames per second of one stream, median over `--frames` frames of each of `--rounds` rounds;
the ratio is ours over StreamDiffusion's, per round, and its median.

Threads: StreamDiffusion runs with the process's torch thread count (`--threads`, default torch's); our engine
with the split it serves with (`engine.backends.onnxruntime.cpu_thread_split`: torch 1 thread and ONNX Runtime
the count when every network runs on ONNX Runtime on the CPU). Both are reported.

StreamDiffusion 0.1.1 pins diffusers 0.24, which cannot import beside this engine's diffusers: it runs here from
its own virtual environment with this engine's versions (docs/backends.md, "Against StreamDiffusion 0.1.1").
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.backends.onnxruntime import cpu_thread_split
from engine.config import LoadConfig, StreamConfig
from engine.loading import Engine, resolve_device, resolve_dtype
from engine.models import ModelBundle, load_models
from engine.stream import StreamEngine

from .clips import tensor_clip
from .report import start_logging, write_json
from .timing import median_fps, time_streams

logger = logging.getLogger(__name__)

PROMPT = "a watercolor painting, soft light"
NEGATIVE_PROMPT = "low quality, blurry"
GUIDANCE_SCALE = 1.2


@dataclass(frozen=True)
class Configuration:
    """One compared configuration: steps and guidance mode."""

    name: str
    t_index_list: tuple[int, ...]
    cfg_type: str

    def stream_config(self, size: int) -> StreamConfig:
        """Our engine's stream under this configuration."""
        return StreamConfig(width=size, height=size, t_index_list=self.t_index_list, cfg_type=self.cfg_type,
                            guidance_scale=GUIDANCE_SCALE, delta=1.0, prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT,
                            similarity_filter=False, seed=2)


CONFIGURATIONS: tuple[Configuration, ...] = (
    Configuration("rcfg_self_2step", (32, 45), "self"),
    Configuration("one_step", (32,), "self"),
    Configuration("four_step", (0, 16, 32, 45), "self"),
    Configuration("full_cfg", (32, 45), "full"),
)


def import_streamdiffusion():
    """StreamDiffusion's `StreamDiffusion` class; `SystemExit` naming the setup when it is not installed."""
    try:
        from streamdiffusion import StreamDiffusion
    except ImportError as error:
        raise SystemExit(
            f"StreamDiffusion 0.1.1 is not installed here ({error}). It runs from a virtual environment of its own: "
            "see docs/backends.md, 'Against StreamDiffusion 0.1.1'.") from error
    return StreamDiffusion


def streamdiffusion_pipe(models: ModelBundle):
    """A diffusers `StableDiffusionPipeline` over `models` (its VAE is the bundle's, TAESD by default)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.tokenizer,
                                   unet=models.unet, scheduler=models.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def streamdiffusion_stream(stream_class, models: ModelBundle, configuration: Configuration, size: int,
                           device: torch.device, dtype: torch.dtype):
    """StreamDiffusion prepared exactly as its README does, on `models` at `size`."""
    stream = stream_class(streamdiffusion_pipe(models), t_index_list=list(configuration.t_index_list),
                          torch_dtype=dtype, width=size, height=size, cfg_type=configuration.cfg_type)
    stream.prepare(PROMPT, NEGATIVE_PROMPT, num_inference_steps=50, guidance_scale=GUIDANCE_SCALE, delta=1.0,
                   generator=torch.Generator(), seed=2)
    return stream


@torch.no_grad()
def streamdiffusion_frame(stream, image: torch.Tensor) -> torch.Tensor:
    """StreamDiffusion 0.1.1's `__call__` on one `[3, H, W]` image in [0, 1], without its CUDA-event timing (and
    with its similarity filter off, as in every row here)."""
    x = stream.image_processor.preprocess(image[None], stream.height, stream.width).to(device=stream.device,
                                                                                        dtype=stream.dtype)
    x_t_latent = stream.encode_image(x)
    x_0_pred_out = stream.predict_x0_batch(x_t_latent)
    return stream.decode_image(x_0_pred_out).detach().clone()


def with_threads(threads: int, step: Callable) -> Callable:
    """`step` run with torch at `threads` intra-op threads (set before each call: the two rows alternate)."""
    def run(frame):
        torch.set_num_threads(threads)
        return step(frame)

    return run


def ratio_summary(ours: list[float], theirs: list[float]) -> dict:
    """Per-round ratios of our fps to StreamDiffusion's, their median and minimum."""
    ratios = [mine / other for mine, other in zip(ours, theirs, strict=True)]
    return {"rounds": [round(value, 3) for value in ratios], "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3)}


def run(model: str = "demo", size: int = 256, frames: int = 30, warmup: int = 5, rounds: int = 3,
        configurations: tuple[Configuration, ...] = CONFIGURATIONS, backend: str = "auto",
        device: str = "cpu", dtype: str = "float32", auto_compile_budget_s: float = 0.0) -> dict:
    """Measure every configuration; returns the JSON-ready results."""
    stream_class = import_streamdiffusion()
    import streamdiffusion

    threads = torch.get_num_threads()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    theirs_models = load_models(model).to(torch_device, torch_dtype)
    ours_models = load_models(model).to(torch_device, torch_dtype)
    load = LoadConfig(model=model, device=device, dtype=dtype, backend=backend,
                      auto_compile_budget_s=auto_compile_budget_s)
    clip = tensor_clip("slow_pan", 60, size, size)
    load_before = os.getloadavg()
    results: dict = {
        "model": model, "size": size, "frames_per_round": frames, "warmup": warmup, "rounds": rounds,
        "backend": backend, "streamdiffusion": getattr(streamdiffusion, "__version__", "0.1.1"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "threads": threads, "torch": torch.__version__, "device": str(torch_device),
                    "dtype": str(torch_dtype).removeprefix("torch.")},
        "configurations": {},
    }
    for configuration in configurations:
        config = configuration.stream_config(size)
        torch.set_num_threads(threads)
        engine = Engine.prepare(ours_models, load, config)
        chosen = engine.config.backend
        ours_threads, ort_threads = cpu_thread_split(threads, chosen, engine.config.vae_backend or chosen,
                                                     torch_device.type)
        ours = StreamEngine(engine, config)
        theirs = streamdiffusion_stream(stream_class, theirs_models, configuration, size, torch_device, torch_dtype)
        if torch_device.type == "cuda":
            steps = {"streamdiffusion": theirs, "ours": ours}
        else:
            steps = {"streamdiffusion": with_threads(threads, lambda image, stream=theirs:
                                                     streamdiffusion_frame(stream, image)),
                     "ours": with_threads(ours_threads, ours)}
        fps: dict[str, list[float]] = {"streamdiffusion": [], "ours": []}
        for index in range(rounds):
            seconds = time_streams(steps, clip, frames, warmup if index == 0 else 0)
            for name in fps:
                fps[name].append(median_fps(seconds[name]))
            logger.info("%s round %d: StreamDiffusion %.2f fps, ours (%s) %.2f fps", configuration.name, index + 1,
                        fps["streamdiffusion"][-1], chosen, fps["ours"][-1])
        torch.set_num_threads(threads)
        results["configurations"][configuration.name] = {
            "t_index_list": list(configuration.t_index_list), "cfg_type": configuration.cfg_type,
            "ours_backend": chosen,
            "threads": {"streamdiffusion_torch": threads, "ours_torch": ours_threads,
                        "ours_onnxruntime_intra_op": ort_threads if "onnxruntime" in (chosen, engine.config.vae_backend)
                        else None},
            "fps": {name: {"rounds": [round(value, 3) for value in values],
                           "median": round(statistics.median(values), 3)} for name, values in fps.items()},
            "ours_vs_streamdiffusion": ratio_summary(fps["ours"], fps["streamdiffusion"]),
        }
    results["machine"]["load_average"] = {"before": [round(value, 2) for value in load_before],
                                          "after": [round(value, 2) for value in os.getloadavg()]}
    return results


def format_table(results: dict) -> str:
    """A plain-text table: per configuration, both fps and the ratio."""
    machine = results["machine"]
    lines = [f"model={results['model']} size={results['size']}x{results['size']} frames={results['frames_per_round']}"
             f"x{results['rounds']} rounds threads={machine['threads']} StreamDiffusion {results['streamdiffusion']} "
             f"load={machine['load_average']['before'][0]}->{machine['load_average']['after'][0]}"]
    lines.append(f"  {'configuration':<16} {'backend':<12} {'StreamDiffusion':>15} {'ours':>8} {'ratio':>7} "
                 f"{'min':>6}")
    for name, row in results["configurations"].items():
        ratio = row["ours_vs_streamdiffusion"]
        lines.append(f"  {name:<16} {row['ours_backend']:<12} {row['fps']['streamdiffusion']['median']:>15.2f} "
                     f"{row['fps']['ours']['median']:>8.2f} {ratio['median']:>6.2f}x {ratio['min']:>5.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the comparison, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streamdiffusion", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="model spec (default demo, the trained demo model)")
    parser.add_argument("--size", type=int, default=256, help="square frame size in pixels")
    parser.add_argument("--frames", type=int, default=30, help="timed frames per round and row (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed frames before the first round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration")
    parser.add_argument("--configurations", default=",".join(item.name for item in CONFIGURATIONS),
                        help="comma-separated subset of " + ", ".join(item.name for item in CONFIGURATIONS))
    parser.add_argument("--backend", default="auto", help="our engine's backend (default auto)")
    parser.add_argument("--auto-compile-budget", type=float, default=0.0,
                        help="seconds auto may spend compiling with torch.compile to time it (0: leave it out)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    start_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    known = {item.name: item for item in CONFIGURATIONS}
    names = [name.strip() for name in args.configurations.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {sorted(known)}")
    results = run(args.model, args.size, args.frames, args.warmup, args.rounds, tuple(known[name] for name in names),
                  args.backend, args.device, args.dtype, args.auto_compile_budget)
    print(format_table(results))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
