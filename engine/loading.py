"""From load-time settings to a ready engine: models on their device and dtype, prepared once, and their runners.

`Engine` is the shared, read-only half of streaming. Everything that touches the shared modules happens
here, at load: moving them to the device and dtype, installing the K/V-cache attention processors, the
memory mode, the backend's runner. A stream (`StreamEngine`) afterwards only reads them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .backends import NetworkRunner, make_runner, runner_name
from .backends.auto import resolve_auto
from .config import LoadConfig, StreamConfig
from .control.sources import ControlSource, make_control_source
from .controlnet import load_controlnet
from .lora import apply_loras
from .memory import apply_memory_mode
from .models import ModelBundle, load_models
from .prompt import install_kv_processors

logger = logging.getLogger(__name__)

__all__ = ["Engine", "load_bundle", "resolve_device", "resolve_dtype"]


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _auto_tensorrt(asked: LoadConfig, resolved: LoadConfig) -> bool:
    """Whether `auto` (for the UNet or the VAE) resolved to TensorRT."""
    return ("auto" in (asked.backend, asked.vae_backend)) and "tensorrt" in (resolved.backend, resolved.vae_backend)


def load_bundle(config: LoadConfig) -> ModelBundle:
    """The `ModelBundle` of `config.model` with `config.loras` fused, on `config.device` in `config.dtype`, in eval
    mode. LoRAs are fused in the precision the model was read in (float32), before the cast.

    Raises:
        ModelLoadError: naming what was tried and what to do instead.
    """
    started = time.perf_counter()
    logger.info("loading model %r (VAE: %s)", config.model, config.vae)
    models = load_models(config.model, use_tiny_vae=config.use_tiny_vae, taesd=config.taesd,
                         config=config.model_config)
    apply_loras(models, config.loras)
    if config.controlnet is not None:
        models.controlnet = load_controlnet(config.controlnet, models.unet)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    logger.info("model %r loaded in %.1f s; moving to %s (%s)", models.name, time.perf_counter() - started,
                device, str(dtype).removeprefix("torch."))
    return models.to(device, dtype)


@dataclass(eq=False)
class Engine:
    """Models loaded for one `LoadConfig`, prepared for streaming, shared read-only by every stream.

    Build it with `Engine.load(config)` (loads the model) or `Engine.prepare(models, config)` (a bundle
    already on its device, e.g. one a test built).

    Args:
        config (`LoadConfig`): how the models were loaded and run.
        models (`ModelBundle`): the shared modules, on `device` in `dtype`.
        device (`torch.device`): where they run.
        dtype (`torch.dtype`): their precision.
        control_source (`ControlSource | None`, defaults to None): with a ControlNet, what makes each frame's
            control image (`LoadConfig.control_preprocessor`).
    """

    config: LoadConfig
    models: ModelBundle
    device: torch.device
    dtype: torch.dtype
    control_source: ControlSource | None = None
    # The runners handed out, by guidance mode: `make_runner` shares a runner only while someone holds it, and
    # a static backend's runner holds its opened graphs, which must outlive the streams that opened them.
    _runners: dict[str | None, NetworkRunner] = field(default_factory=dict, repr=False)
    _fixed_runner: NetworkRunner | None = field(default=None, repr=False)

    @classmethod
    def load(cls, config: LoadConfig, stream: StreamConfig | None = None) -> Engine:
        """Load `config.model` and prepare it (see `prepare`)."""
        return cls.prepare(load_bundle(config), config, stream)

    @classmethod
    def prepare(cls, models: ModelBundle, config: LoadConfig, stream: StreamConfig | None = None) -> Engine:
        """Prepare `models` (already on their device and dtype) for streaming under `config`: the attention
        processors (`engine.prompt.CachedKVAttnProcessor`), the memory mode and the backend's runner are set
        up once, here. A `backend="auto"` becomes the backend that runs fastest here (`engine.backends.auto`,
        timed on `stream`'s workload, default `StreamConfig()`), and the engine's `config` names it.

        Raises:
            ValueError: the LoRAs fused into `models` are not `config.loras` (`load_bundle` fuses them), or
                `models` has a ControlNet and `config` names none, or the other way round.
            ControlSourceError: the control preprocessor's weights are missing (`engine.control.sources`).
        """
        if tuple(models.loras) != config.loras:
            raise ValueError(f"`loras`: the models have {list(map(str, models.loras)) or 'no LoRA'} fused but the "
                             f"config names {list(map(str, config.loras)) or 'none'}; load them with `load_bundle`")
        if (models.controlnet is None) != (config.controlnet is None):
            raise ValueError(f"`controlnet`: the config names {config.controlnet!r} but the models have "
                             f"{'a' if models.controlnet is not None else 'no'} ControlNet; load them with "
                             "`load_bundle`")
        parameter = next(models.unet.parameters())
        # Always ours: without a K/V cache it attends exactly as diffusers' own, and streams' attention banks
        # (`temporal="bank"`) reach it the same way as the cache.
        install_kv_processors(models.unet)
        apply_memory_mode(models, config.memory)
        asked = config
        config, _ = resolve_auto(models, asked, stream)
        source = None if models.controlnet is None else make_control_source(config, parameter.device)
        engine = cls(config, models, parameter.device, parameter.dtype, source)
        started = time.perf_counter()
        try:
            # An `auto` TensorRT is chosen unmeasured: build its graphs for `stream` now, where a failed build
            # can still fall back, rather than at the first session.
            runner = engine.runner(stream or StreamConfig()) if _auto_tensorrt(asked, config) else engine.runner()
        except Exception as error:
            if not _auto_tensorrt(asked, config):
                raise
            failure = f"its engines failed to build here ({type(error).__name__}: {error})"
            logger.warning("--backend auto: tensorrt cannot serve, %s; falling back to the next backend", failure)
            config, _ = resolve_auto(models, asked, stream, tensorrt_failure=failure)
            engine = cls(config, models, parameter.device, parameter.dtype, source)
            runner = engine.runner()
        logger.info("backend %s ready in %.1f s", runner_name(runner), time.perf_counter() - started)
        return engine

    def with_runner(self, runner: NetworkRunner) -> Engine:
        """This engine (same models, config, device, dtype; nothing prepared again) with every stream on `runner`,
        e.g. a runner of another cache folder or exporter, or one that records its calls."""
        return Engine(self.config, self.models, self.device, self.dtype, self.control_source, _fixed_runner=runner)

    def runner(self, stream: StreamConfig | None = None) -> NetworkRunner:
        """The shared runner of this engine's backend; with `stream`, the graphs it needs are opened first."""
        if self._fixed_runner is not None:
            if stream is not None:
                self._fixed_runner.prepare(stream, self.config.kv_cache)
            return self._fixed_runner
        runner = make_runner(self.models, self.config, stream)
        self._runners[None if stream is None else stream.cfg_type] = runner
        return runner

    @property
    def name(self) -> str:
        """The model's name (its spec)."""
        return self.models.name
