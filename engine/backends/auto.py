"""`--backend auto`: the backend that runs fastest on this machine, measured once and remembered.

TensorRT stays the choice wherever it can run (CUDA and tensorrt present). Elsewhere the candidates that can
run here (`eager`; `onnxruntime` with a provider for the models' device and dtype; `compile` when
`LoadConfig.auto_compile_budget_s` allows it) are timed on the stream's own workload: a few VAE-encode, UNet
and VAE-decode calls at the configured size, guidance mode and steps, each backend at the thread split it
would serve with (`onnxruntime.cpu_thread_split`). The fastest wins (`choose_backend` with the measured
speeds). The verdict is cached in `auto-backend.json` beside the engine cache, keyed by everything that changes
it (model fingerprint, size, guidance mode and batch, dtype, device, torch and ONNX Runtime versions, thread
count, K/V cache), and every choice is logged with its figures.

With a ControlNet the workload has its call too: each round runs the ControlNet on the UNet's rows and the
UNet on those residuals (the stream's call at a nonzero `controlnet_scale`), and `compile`, which has no ControlNet,
is not a candidate. The ControlNet's fingerprint is then part of the key.

torch.compile compiles for minutes on a CPU: its first calls are logged one graph at a time with their
duration, and a compile that took longer than `auto_compile_budget_s` is not chosen (the compile is paid again
at every start, less what Inductor's own cache saves), however fast it ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import guidance
from ..conditioning import PromptEncoder
from ..config import LoadConfig, StreamConfig
from ..controlnet import embed_control
from ..models import ModelBundle
from ..prompt import Conditioning
from .cache import default_cache_dir, gpu_name, module_fingerprint
from .factory import (
    Availability,
    BackendChoice,
    choose_backend,
    new_runner,
    probe_availability,
    unavailable_reason,
)
from .onnx_export import DEFAULT_EXPORTER
from .onnxruntime import claim_cpu_threads, cpu_thread_split, default_intra_op_threads, thread_budget

logger = logging.getLogger(__name__)

#: The verdicts' file, in the engine cache folder.
VERDICTS_FILE = "auto-backend.json"
#: Timed rounds per candidate (each one VAE encode, one UNet call, one VAE decode); the median counts.
ROUNDS = 5
#: Untimed rounds after the first call (which exports, opens or compiles) and before the timed ones.
WARMUP_ROUNDS = 2


@dataclass(frozen=True)
class CalibrationKey:
    """What an `auto` verdict depends on; a change in any field measures again."""

    model: str
    width: int
    height: int
    cfg_type: str
    unet_batch: int
    frame_buffer_size: int
    dtype: str
    device: str
    torch: str
    onnxruntime: str
    threads: int
    onnxruntime_threads: int
    kv_cache: bool
    compile_budget_s: float
    #: The ControlNet's fingerprint, None without one (its call is then not in the workload).
    controlnet: str | None = None

    def fields(self) -> dict:
        """The fields as a dict, without `controlnet` when there is none (so keys measured before ControlNets
        existed keep their digests)."""
        fields = dataclasses.asdict(self)
        if self.controlnet is None:
            del fields["controlnet"]
        return fields

    def digest(self) -> str:
        """SHA-256 of every field, 20 hex digits."""
        text = json.dumps(self.fields(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Measurement:
    """One candidate timed here: `fps` of its networks (None when it failed or was dropped), the seconds its
    first call took (`startup_s`: export, session opening or compilation) and why it was dropped."""

    backend: str
    fps: float | None
    startup_s: float
    dropped: str | None = None


def calibration_candidates(available: Availability, compile_budget_s: float,
                           controlnet: bool = False) -> tuple[str, ...]:
    """The backends `auto` times here: eager always, ONNX Runtime where it can run the models, compile when
    the budget allows it, torch.compile can run and there is no `controlnet` (its runner has none; TensorRT is
    chosen without timing where it runs)."""
    candidates = ["eager"]
    if unavailable_reason("onnxruntime", available) is None:
        candidates.append("onnxruntime")
    if compile_budget_s > 0 and not controlnet and unavailable_reason("compile", available) is None:
        candidates.append("compile")
    return tuple(candidates)


def measured_availability(available: Availability, measurements: tuple[Measurement, ...]) -> Availability:
    """`available` with the measured speeds of the candidates that were not dropped."""
    speeds = tuple((item.backend, item.fps) for item in measurements if item.fps is not None and item.dropped is None)
    return dataclasses.replace(available, measured_fps=speeds)


def describe(measurements: tuple[Measurement, ...]) -> str:
    """One line of figures: `onnxruntime 46.1 fps (first call 2.3 s), compile dropped (...)`."""
    parts = []
    for item in measurements:
        if item.fps is not None and item.dropped is None:
            parts.append(f"{item.backend} {item.fps:.1f} fps (first call {item.startup_s:.1f} s)")
        else:
            parts.append(f"{item.backend} dropped ({item.dropped})")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- the verdicts file


def read_verdict(folder: Path, key: CalibrationKey) -> tuple[Measurement, ...] | None:
    """The cached measurements of `key`, None when there are none (or the file is unreadable)."""
    path = folder / VERDICTS_FILE
    try:
        entry = json.loads(path.read_text()).get(key.digest())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as error:
        logger.warning("ignoring %s: %s", path, error)
        return None
    if not entry or entry.get("key") != key.fields():
        return None
    return tuple(Measurement(**item) for item in entry["measurements"])


def read_verdicts(folder: Path) -> list[dict]:
    """Every cached verdict in `folder` (its key, choice, time and measurements), oldest first; [] when none."""
    try:
        verdicts = json.loads((folder / VERDICTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(verdicts, dict):
        return []
    return sorted((entry for entry in verdicts.values() if isinstance(entry, dict) and "key" in entry),
                  key=lambda entry: entry.get("measured_at", ""))


def write_verdict(folder: Path, key: CalibrationKey, measurements: tuple[Measurement, ...], chosen: str) -> Path:
    """Add `key`'s measurements and choice to the verdicts file (written whole, then renamed into place)."""
    path = folder / VERDICTS_FILE
    folder.mkdir(parents=True, exist_ok=True)
    try:
        verdicts = json.loads(path.read_text())
    except (OSError, ValueError):
        verdicts = {}
    verdicts[key.digest()] = {"key": key.fields(), "chosen": chosen,
                              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                              "measurements": [dataclasses.asdict(item) for item in measurements]}
    handle, temporary = tempfile.mkstemp(prefix=f".{VERDICTS_FILE}.", dir=folder)
    with os.fdopen(handle, "w") as file:
        json.dump(verdicts, file, indent=2)
    os.replace(temporary, path)
    return path


# ---------------------------------------------------------------------------------------------- measuring


def _onnxruntime_version() -> str:
    try:
        import onnxruntime
    except Exception:  # a broken install raises more than ImportError
        return "none"
    return onnxruntime.__version__


def calibration_key(models: ModelBundle, load: LoadConfig, stream: StreamConfig, threads: int) -> CalibrationKey:
    """The `CalibrationKey` of `models` under `load` for a stream under `stream` with a `threads` budget."""
    parameter = next(models.unet.parameters())
    fingerprint = hashlib.sha256(
        (module_fingerprint(models.unet) + module_fingerprint(models.vae)).encode()).hexdigest()[:20]
    device = str(parameter.device) if parameter.device.type != "cuda" else gpu_name(parameter.device)
    return CalibrationKey(
        model=fingerprint, width=stream.width, height=stream.height, cfg_type=stream.cfg_type,
        unet_batch=guidance.unet_batch_size(stream.cfg_type, stream.denoising_steps, stream.frame_buffer_size),
        frame_buffer_size=stream.frame_buffer_size, dtype=str(parameter.dtype).removeprefix("torch."),
        device=device, torch=torch.__version__, onnxruntime=_onnxruntime_version(), threads=threads,
        onnxruntime_threads=default_intra_op_threads(), kv_cache=load.kv_cache,
        compile_budget_s=load.auto_compile_budget_s,
        controlnet=None if models.controlnet is None else module_fingerprint(models.controlnet)[:20])


def _workload(models: ModelBundle, stream: StreamConfig, kv_cache: bool):
    """The inputs of one frame's network calls under `stream`: an image batch, the UNet's latents, timesteps
    and conditioning, and with a ControlNet the rows' embedded control images (else None; the embedding itself runs
    in PyTorch on every backend, once per frame, so it is not a backend's cost)."""
    parameter = next(models.unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    generator = torch.Generator().manual_seed(0)
    f, n = stream.frame_buffer_size, stream.denoising_steps
    rows = guidance.unet_batch_size(stream.cfg_type, n, f)
    factor = models.vae_scale_factor
    latent_shape = (models.unet.config.in_channels, stream.height // factor, stream.width // factor)
    images = (torch.rand((f, 3, stream.height, stream.width), generator=generator) * 2 - 1).to(device, dtype)
    latents = torch.randn((rows, *latent_shape), generator=generator).to(device, dtype)
    timesteps = torch.full((rows,), 500, dtype=torch.long, device=device)
    # The stream's own prompt encoder: SDXL's pooled embeds and time ids come with it, as they do per frame.
    layout = (stream.cfg_type, n * f)
    conditioning = PromptEncoder(models, kv_cache).state(stream, [layout]).layouts[layout]
    embeddings = None
    if models.controlnet is not None:
        control_images = torch.rand((rows, 3, stream.height, stream.width), generator=generator).to(device, dtype)
        with torch.no_grad():
            embeddings = embed_control(models.controlnet, control_images)
    return images, latents, timesteps, conditioning, embeddings


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_backend(backend: str, models: ModelBundle, load: LoadConfig, stream: StreamConfig,
                    cache_dir: Path | None = None, rounds: int = ROUNDS,
                    clock: Callable[[], float] = time.perf_counter) -> Measurement:
    """Time `backend`'s networks on one frame's calls under `stream` (encode, [ControlNet,] UNet, decode), at the
    thread split it would serve with; its first call (export, session opening, compilation) is timed alone and
    logged graph by graph. A backend that fails is dropped with its error, never raised."""
    parameter = next(models.unet.parameters())
    device = parameter.device
    images, latents, timesteps, conditioning, embeddings = _workload(models, stream, load.kv_cache)
    f = stream.frame_buffer_size
    calls = [("VAE encoder", lambda runner: runner.encode(images)),
             ("UNet", lambda runner: runner.unet(latents, timesteps, conditioning)),
             ("VAE decoder", lambda runner: runner.decode(latents[:f]))]
    if embeddings is not None:
        # The UNet takes the residuals the ControlNet call of the same round made, as a stream's call does.
        controlled: list[Conditioning] = [conditioning]

        def control(runner) -> None:
            residuals = runner.controlnet(latents, timesteps, conditioning, embeddings)
            controlled[0] = dataclasses.replace(conditioning, control=residuals)

        calls[1:2] = [("ControlNet", control),
                      ("UNet", lambda runner: runner.unet(latents, timesteps, controlled[0]))]
    torch_threads, _ = cpu_thread_split(thread_budget(), backend, backend, device.type)
    before = torch.get_num_threads()
    started = clock()
    try:
        runner = new_runner(backend, models, stream.cfg_type, cache_dir, DEFAULT_EXPORTER, load.resolution_range,
                            load.trt_cache_max_gb)
        # Exports and compiles log their own progress (a heartbeat while they run, then their duration).
        runner.prepare(stream, load.kv_cache)
        for name, call in calls:
            graph_started = clock()
            call(runner)
            _wait(device)
            logger.info("auto: first %s call on %s took %.1f s", name, backend, clock() - graph_started)
        startup_s = clock() - started
        if backend == "compile":
            logger.info("auto: torch.compile ready in %.1f s", startup_s)
            if startup_s > load.auto_compile_budget_s:
                return Measurement(backend, None, round(startup_s, 2),
                                   f"compiling took {startup_s:.0f} s, over auto_compile_budget_s="
                                   f"{load.auto_compile_budget_s:g}")
        torch.set_num_threads(torch_threads)
        seconds = []
        for index in range(WARMUP_ROUNDS + rounds):
            round_started = clock()
            for _, call in calls:
                call(runner)
            _wait(device)
            if index >= WARMUP_ROUNDS:
                seconds.append(clock() - round_started)
    except Exception as error:  # any failure drops the candidate; the reason is logged and cached
        logger.warning("auto: %s cannot run here: %s: %s", backend, type(error).__name__, error)
        return Measurement(backend, None, round(clock() - started, 2), f"{type(error).__name__}: {error}")
    finally:
        torch.set_num_threads(before)
    fps = 1.0 / statistics.median(seconds)
    logger.info("auto: %s runs one frame's networks at %.1f fps (first call %.1f s)", backend, fps, startup_s)
    return Measurement(backend, round(fps, 3), round(startup_s, 2))


def resolve_auto(models: ModelBundle, load: LoadConfig, stream: StreamConfig | None = None,
                 cache_dir: Path | None = None,
                 measure: Callable[..., Measurement] = measure_backend,
                 tensorrt_failure: str | None = None) -> tuple[LoadConfig, BackendChoice]:
    """`load` with an `auto` backend (and `vae_backend`) made concrete for `models` on this machine, and why.

    TensorRT where it runs; eager under a memory mode (it slices the eager modules), for streams with a skip
    policy (it works inside the eager UNet) or `temporal="bank"` (not measured; onnxruntime and tensorrt run it
    when named); else the fastest candidate measured on `stream`'s workload (default `StreamConfig()`), from the
    verdicts file when this key was measured before. `tensorrt_failure` (why TensorRT's build failed here,
    `Engine.prepare`) takes TensorRT out. Then, with every network on ONNX Runtime on the CPU, torch's threads
    go to ONNX Runtime
    (`claim_cpu_threads`). A `load` without `auto` only gets that last step.
    """
    device = next(models.unet.parameters()).device
    if "auto" in (load.backend, load.vae_backend):
        stream = stream or StreamConfig()
        choice = _choose(models, load, stream, cache_dir, measure, tensorrt_failure)
        logger.info("--backend auto chose %s: %s", choice.backend, choice.reason)
        changes = {"backend": choice.backend} if load.backend == "auto" else {}
        if load.vae_backend == "auto":
            changes["vae_backend"] = choice.backend
        load = load.replace(**changes)
    else:
        choice = BackendChoice(load.backend, "asked for by name")
    claim_cpu_threads(load.backend, load.vae_backend or load.backend, device.type)
    return load, choice


def _choose(models: ModelBundle, load: LoadConfig, stream: StreamConfig, cache_dir: Path | None,
            measure: Callable[..., Measurement], tensorrt_failure: str | None = None) -> BackendChoice:
    parameter = next(models.unet.parameters())
    available = probe_availability(parameter.device, str(parameter.dtype).removeprefix("torch."))
    if tensorrt_failure is not None:
        available = dataclasses.replace(available, tensorrt_reason=tensorrt_failure)
    if load.memory != "off":
        return BackendChoice("eager", f"memory mode {load.memory!r} slices the eager modules")
    if stream.skip_policy != "off":
        return BackendChoice("eager", "the streams' skip policy works inside the eager UNet")
    if stream.temporal == "bank":
        # Not measured: a bank graph per bank size would be exported for the measurement alone, and the bank's
        # extended attention changes the balance measured for plain streams. Named, onnxruntime/tensorrt run it.
        return BackendChoice("eager", "an attention bank stream takes the eager UNet unmeasured (onnxruntime and "
                                      "tensorrt run it when asked for by name)")
    if models.controlnet is not None and load.resolution_range is not None:
        return BackendChoice("eager", "a ControlNet's compiled graphs are static: with a resolution range it runs on "
                                      "the eager backend")
    if unavailable_reason("tensorrt", available) is None:
        return choose_backend("auto", available)
    candidates = calibration_candidates(available, load.auto_compile_budget_s, models.controlnet is not None)
    if len(candidates) == 1:
        return choose_backend("auto", available)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = calibration_key(models, load, stream, thread_budget())
    measurements = read_verdict(folder, key)
    if measurements is not None and {item.backend for item in measurements} == set(candidates):
        logger.info("auto: measured before on this machine (%s, key %s)", folder / VERDICTS_FILE, key.digest())
    else:
        logger.info("auto: timing %s on %dx%d %s, batch %d (a few calls each; cached in %s)",
                    ", ".join(candidates), stream.width, stream.height, stream.cfg_type, key.unet_batch,
                    folder / VERDICTS_FILE)
        measurements = tuple(measure(backend, models, load, stream, cache_dir) for backend in candidates)
        choice = choose_backend("auto", measured_availability(available, measurements))
        try:
            write_verdict(folder, key, measurements, choice.backend)
        except OSError as error:  # a read-only cache folder costs a new measurement next time, nothing else
            logger.warning("auto: could not cache the verdict in %s: %s", folder, error)
    choice = choose_backend("auto", measured_availability(available, measurements))
    return BackendChoice(choice.backend, f"{choice.reason}; measured here: {describe(measurements)}")
