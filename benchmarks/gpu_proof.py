"""`python -m benchmarks.gpu_proof [--json out/gpu-proof.json]`: a real-size proof on one GPU, in one command.

The models are the real architectures at full size with seeded random weights (`sd-turbo-random`: the SD 2.1
UNet, OpenCLIP-H's text tower, TAESD; `sdxl-turbo-random`: the SDXL UNet, CLIP-L and OpenCLIP-bigG, TAESDXL's
architecture), built on the GPU, so nothing is downloaded: what they cost is what the real weights cost. At 512²,
for each model:

- fps and per-stage times (VAE encode, UNet, VAE decode) of one stream, for a 1-step `none` and a 2-step `self`
  stream batch, on eager fp16, `torch.compile` without and with CUDA graphs, and TensorRT when it imports;
- fp16 against fp32 outputs of the same frames (PSNR, eager);
- StreamDiffusion 0.1.1 on the same weights and GPU, frame by frame in turn with ours (SD family; when installed);
- aggregate fps of 4 and 8 streams with cross-session batching (the runtime, as the server runs it);
- peak GPU memory.

Rows run in that order of priority within `--budget` seconds (default 420, so the whole command stays within 8
minutes with loading); a row that would start past it is reported as skipped, never silently dropped. Needs
torch, diffusers and transformers (plus TensorRT when it imports). `--dry-run` runs the same code on the CPU at
64² with `tiny` and `tiny-sdxl` and a few frames (CI runs it); torch.compile rows are skipped there (minutes of
CPU compilation) and CUDA graphs need CUDA.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import LoadConfig, StreamConfig
from engine.loading import Engine
from engine.models import ModelBundle, load_models
from engine.stream import StreamEngine

from .batching import measure
from .clips import tensor_clip
from .report import start_logging, write_json
from .streamdiffusion import Configuration, import_streamdiffusion, streamdiffusion_frame, streamdiffusion_stream
from .timing import median_fps, time_streams

logger = logging.getLogger(__name__)

REAL_MODELS = ("sd-turbo-random", "sdxl-turbo-random")
DRY_MODELS = ("tiny", "tiny-sdxl")
PROMPT = "a watercolor painting of a fox, soft light"


@dataclass(frozen=True)
class Row:
    """One stream configuration of the proof."""

    name: str
    t_index_list: tuple[int, ...]
    cfg_type: str

    def config(self, size: int) -> StreamConfig:
        return StreamConfig(width=size, height=size, t_index_list=self.t_index_list, cfg_type=self.cfg_type,
                            prompt=PROMPT, similarity_filter=False, seed=2)


ROWS = (Row("1step_none", (32,), "none"), Row("2step_self", (32, 45), "self"))


class RowSkipped(RuntimeError):
    """A row that cannot run here, with why."""


class Budget:
    """Seconds left for the rows; a row starts only while some are."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.deadline = clock() + seconds
        self.clock = clock

    def spent(self) -> bool:
        return self.clock() >= self.deadline


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (inf when equal, NaN when either holds a non-finite value)."""
    reference, other = reference.float(), other.float()
    if not (torch.isfinite(reference).all() and torch.isfinite(other).all()):
        return math.nan
    mse = torch.mean((reference - other) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def time_stages(stream: StreamEngine, clip: list[torch.Tensor], frames: int, warmup: int) -> dict:
    """fps of whole frames and the median ms of each stage (encode, UNet, decode), the GPU waited for after each."""
    device = stream.device
    started = time.perf_counter()
    for index in range(warmup):
        stream(clip[index % len(clip)])
    synchronize(device)
    first_s = time.perf_counter() - started
    stages: dict[str, list[float]] = {"encode": [], "unet": [], "decode": []}
    totals = []
    for index in range(frames):
        frame = clip[index % len(clip)]
        marks = [time.perf_counter()]
        work = stream.begin(frame)
        synchronize(device)
        marks.append(time.perf_counter())
        work = stream.advance(work)
        synchronize(device)
        marks.append(time.perf_counter())
        stream.finish(work)
        synchronize(device)
        marks.append(time.perf_counter())
        for name, (start, end) in zip(stages, zip(marks, marks[1:], strict=False), strict=True):
            stages[name].append(end - start)
        totals.append(marks[-1] - marks[0])
    return {"fps": round(1.0 / statistics.median(totals), 2), "warmup_s": round(first_s, 2),
            "stages_ms": {name: round(statistics.median(values) * 1000, 2) for name, values in stages.items()}}


def backends(models: ModelBundle, load: LoadConfig, eager: Engine, dry_run: bool) -> dict[str, Callable[[], Engine]]:
    """The backends to time, each a maker of its engine (made when its rows run, so a failure is that row's)."""
    from engine.backends.compiled import TorchCompileRunner
    from engine.backends.tensorrt import tensorrt_unavailable_reason

    def skipped(reason: str) -> Callable[[], Engine]:
        def refuse() -> Engine:
            raise RowSkipped(reason)
        return refuse

    cuda = eager.device.type == "cuda"
    makers: dict[str, Callable[[], Engine]] = {"eager_" + str(eager.dtype).removeprefix("torch."): lambda: eager}
    if dry_run:
        makers["compile"] = skipped("dry run: torch.compile takes minutes of CPU compilation")
    else:
        makers["compile"] = lambda: eager.with_runner(TorchCompileRunner(models))
    makers["compile_cudagraphs"] = (lambda: eager.with_runner(TorchCompileRunner(models, mode="reduce-overhead"))) \
        if cuda and not dry_run else skipped("CUDA graphs need CUDA" if not cuda else "dry run")
    reason = tensorrt_unavailable_reason()
    makers["tensorrt"] = skipped(reason) if reason is not None else \
        (lambda: Engine.prepare(models, load.replace(backend="tensorrt")))
    return makers


def streamdiffusion_row(models: ModelBundle, eager: Engine, size: int, clip: list[torch.Tensor],
                        frames: int, warmup: int) -> dict:
    """Ours (eager) and StreamDiffusion 0.1.1 on the 2-step `self` row, frame by frame in turn."""
    if models.family == "sdxl":
        return {"skipped": "StreamDiffusion 0.1.1 runs the SD family only"}
    try:
        stream_class = import_streamdiffusion()
    except SystemExit as error:
        return {"skipped": str(error)}
    configuration = Configuration("rcfg_self_2step", (32, 45), "self")
    theirs = streamdiffusion_stream(stream_class, models, configuration, size, eager.device, eager.dtype)
    ours = StreamEngine(eager, configuration.stream_config(size))

    def step(call):
        def run(frame):
            output = call(frame)
            synchronize(eager.device)
            return output
        return run

    seconds = time_streams({"ours": step(ours), "streamdiffusion": step(lambda f: streamdiffusion_frame(theirs, f))},
                           clip, frames, warmup)
    fps = {name: round(median_fps(values), 2) for name, values in seconds.items()}
    return {**fps, "ratio": round(fps["ours"] / fps["streamdiffusion"], 3)}


def prove_model(name: str, size: int, device: torch.device, frames: int, warmup: int, budget: Budget,
                dry_run: bool, aggregate_s: float) -> dict:
    """Every measurement of one model (see the module docstring)."""
    result: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with torch.device(device):  # a real-size model is built on the GPU, never copied from the CPU
        models = load_models(name)
    models.to(device, torch.float32)
    result["build_s"] = round(time.perf_counter() - started, 1)
    clip = tensor_clip("fast_motion", 8, size, size)
    load = LoadConfig(model=name, backend="eager", device=device.type, dtype="float32")
    reference = Row("1step_none", (32,), "none").config(size)
    fp32 = [StreamEngine(Engine.prepare(models, load), reference)(frame) for frame in clip[:4]]
    half = torch.float16
    models.to(device, half)
    load = load.replace(dtype="float16")
    eager = Engine.prepare(models, load)
    fp16 = [StreamEngine(eager, reference)(frame) for frame in clip[:4]]
    result["fp16_vs_fp32_psnr_db"] = round(statistics.median(psnr(a, b) for a, b in zip(fp32, fp16, strict=True)), 2)
    del fp32, fp16
    result["rows"] = {}
    for backend, make in backends(models, load, eager, dry_run).items():
        for row in ROWS:
            key = f"{backend}/{row.name}"
            if budget.spent():
                result["rows"][key] = {"skipped": "over the time budget (--budget)"}
                continue
            try:
                engine = make()
                result["rows"][key] = time_stages(StreamEngine(engine, row.config(size)), clip, frames, warmup)
            except RowSkipped as error:
                result["rows"][key] = {"skipped": str(error)}
            except Exception as error:  # one backend failing is that row's result, not the proof's end
                result["rows"][key] = {"skipped": f"failed: {type(error).__name__}: {error}"}
            logger.info("%s %s: %s", name, key, result["rows"][key])
    if budget.spent():
        result["streamdiffusion"] = {"skipped": "over the time budget (--budget)"}
    else:
        result["streamdiffusion"] = streamdiffusion_row(models, eager, size, clip, frames, warmup)
    logger.info("%s StreamDiffusion 0.1.1: %s", name, result["streamdiffusion"])
    result["aggregate_fps"] = {}
    for streams in (4, 8):
        if budget.spent():
            result["aggregate_fps"][str(streams)] = {"skipped": "over the time budget (--budget)"}
            continue
        fps, batch = measure(eager, ROWS[1].config(size), streams, max_batch=streams, duration=aggregate_s)
        result["aggregate_fps"][str(streams)] = {"fps": round(fps, 2), "mean_batch": round(batch, 2)}
        logger.info("%s %d streams: %.1f fps in all (mean batch %.2f)", name, streams, fps, batch)
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del models, eager
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(dry_run: bool = False, size: int | None = None, frames: int | None = None, budget_s: float = 420.0) -> dict:
    """The proof's report (see the module docstring)."""
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("the GPU proof needs a CUDA GPU (torch sees none); `--dry-run` runs its code on the CPU")
    device = torch.device("cpu" if dry_run else "cuda")
    models = DRY_MODELS if dry_run else REAL_MODELS
    size, frames = size or (64 if dry_run else 512), frames or (3 if dry_run else 30)
    warmup, aggregate_s = (1, 1.0) if dry_run else (5, 5.0)
    budget = Budget(budget_s)
    report = {"dry_run": dry_run, "size": size, "frames": frames, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "models": {}}
    for name in models:
        logger.info("gpu proof: %s at %d²", name, size)
        report["models"][name] = prove_model(name, size, device, frames, warmup, budget, dry_run, aggregate_s)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_proof", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report here (e.g. out/gpu-proof.json)")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at 64² with tiny models")
    parser.add_argument("--size", type=int, help="frame size (default 512; 64 with --dry-run)")
    parser.add_argument("--frames", type=int, help="timed frames per row (default 30; 3 with --dry-run)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the rows after loading")
    args = parser.parse_args(argv)
    start_logging()
    # diffusers warns on every in-place cast of a model it did not load itself (every row here casts on purpose).
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    report = run(args.dry_run, args.size, args.frames, args.budget)
    write_json(args.json, report)
    for name, result in report["models"].items():
        print(f"{name}: fp16 vs fp32 {result['fp16_vs_fp32_psnr_db']} dB; peak {result.get('peak_memory_gb', '-')} GB")
        for key, row in result["rows"].items():
            print(f"  {key:32s} " + (f"{row['fps']:8.2f} fps  {row['stages_ms']}" if "fps" in row
                                     else f"skipped: {row['skipped']}"))
        print(f"  StreamDiffusion 0.1.1: {result['streamdiffusion']}")
        print(f"  aggregate: {result['aggregate_fps']}")


if __name__ == "__main__":
    main()
