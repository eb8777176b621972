"""Typed engine configuration, split by owner: the one source of every engine default.

- `LoadConfig`: what the shared models are and how they run (model, VAE, device, dtype, backend, memory
  mode, K/V cache). Fixed for the life of a loaded engine; streams never change it.
- `RuntimeOptions`: how the threaded runtime serves its streams (JPEG quality, pixel limit, batching).
- `StreamConfig`: one stream's parameters (size, schedule, guidance, prompt, filter, skip policy with its
  tunables nested in `SkipSettings`). `HOT_PARAMS` change between two frames; `REPREPARE_PARAMS` re-prepare
  the stream; the rest are fixed when the stream opens.

Parameters travel flat on the wire (`skip_cut_threshold`, `adacache_codebook`, ...): `StreamConfig.updated`
and `StreamConfig.flat_params` translate between the flat names and the nested settings.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

CfgType = Literal["none", "self", "initialize", "full"]
PromptBlend = Literal["linear", "slerp"]
PROMPT_BLENDS: tuple[str, ...] = ("linear", "slerp")
CFG_TYPES: tuple[str, ...] = ("none", "self", "initialize", "full")
BACKENDS: tuple[str, ...] = ("eager", "onnxruntime", "tensorrt", "compile", "auto")
SKIP_POLICIES: tuple[str, ...] = ("off", "rehash", "adacache")
TEMPORAL_MODES: tuple[str, ...] = ("off", "feedback", "bank", "flow")
#: Most frames a `bank` stream keeps.
MAX_BANK_SIZE = 8
MEMORY_MODES: tuple[str, ...] = ("off", "slice", "group")
VAES: tuple[str, ...] = ("tiny", "full")
#: How a ControlNet's control image is made from each input frame (`engine.control`).
CONTROL_PREPROCESSORS: tuple[str, ...] = ("canny", "depth", "pose", "image")
#: Largest `controlnet_scale`: far past any useful strength, it only bounds what a client can ask.
MAX_CONTROLNET_SCALE = 5.0
#: Most frames a ControlNet's residuals may be reused for (`controlnet_reuse_interval`).
MAX_CONTROLNET_REUSE_INTERVAL = 60
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
#: Most entries of `adacache_codebook`.
MAX_CODEBOOK_ENTRIES = 16
#: Most entries of a weighted `prompts` or `seeds` list (each prompt is encoded and cached per stream).
MAX_BLEND_ITEMS = 8
#: Longest prompt or seed transition, in frames (20 s at 30 fps).
MAX_TRANSITION_FRAMES = 600
#: What a webcam or capture card sends (1920×1080 either way round): decoding cost grows with pixels, and a
#: few input threads decode every stream's frames, so the limit also bounds what one frame costs the others.
DEFAULT_MAX_PIXELS = 1920 * 1080


# What TensorRT optimises for when no opt size is given: the size most sessions run (clamped into the range).
DEFAULT_OPT_SIZE = 512

_RANGE_TEXT = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*(?::\s*(\d+)\s*)?$")


@dataclass(frozen=True)
class ResolutionRange:
    """Frame sizes, each side from `min_size` to `max_size` pixels, served by one dynamic-shape graph.

    Args:
        min_size (`int`): the smallest height or width, in pixels.
        max_size (`int`): the largest height or width, in pixels.
        opt_size (`int`): the size TensorRT tunes its kernels for (the profile's opt) and the export's
            sample size; it is part of the cache key.
    """

    min_size: int
    max_size: int
    opt_size: int

    def __post_init__(self) -> None:
        if not 0 < self.min_size <= self.opt_size <= self.max_size:
            raise ValueError(f"a resolution range needs 0 < min <= opt <= max, got {self.min_size}-{self.max_size} "
                             f"with opt {self.opt_size}")
        if any(size % 8 for size in (self.min_size, self.max_size, self.opt_size)):
            raise ValueError(f"resolution range sizes must be multiples of 8, got {self}")

    @classmethod
    def between(cls, min_size: int, max_size: int, opt_size: int | None = None) -> ResolutionRange:
        """The range `min_size`–`max_size`; `opt_size` defaults to 512 clamped into the range."""
        if opt_size is None:
            opt_size = min(max(DEFAULT_OPT_SIZE, min_size), max_size)
        return cls(int(min_size), int(max_size), int(opt_size))

    def covers(self, height: int, width: int, multiple: int) -> bool:
        """Whether a `height`×`width` frame runs on this range's graphs (both sides inside, multiples of `multiple`)."""
        return all(self.min_size <= size <= self.max_size and size % multiple == 0 for size in (height, width))

    def key(self) -> tuple[int, int, int]:
        """(min, opt, max): the range's part of a cache key."""
        return self.min_size, self.opt_size, self.max_size

    def __str__(self) -> str:
        default_opt = min(max(DEFAULT_OPT_SIZE, self.min_size), self.max_size)
        suffix = "" if self.opt_size == default_opt else f":{self.opt_size}"
        return f"{self.min_size}-{self.max_size}{suffix}"


def parse_resolution_range(text: str) -> ResolutionRange:
    """`"256-1024"` (opt 512) or `"256-1024:768"` (opt 768) as a `ResolutionRange`.

    Raises:
        ValueError: text of another form, or sizes that do not make a range.
    """
    match = _RANGE_TEXT.match(text)
    if match is None:
        raise ValueError(f"a resolution range is MIN-MAX or MIN-MAX:OPT in pixels (e.g. 256-1024), got {text!r}")
    low, high, opt = match.groups()
    return ResolutionRange.between(int(low), int(high), int(opt) if opt is not None else None)



@dataclass(frozen=True)
class LoraSpec:
    """One LoRA fused into the shared UNet (and text encoders, where it has weights for them) at load time.

    Args:
        source (`str`): a hub id, a folder holding one LoRA `.safetensors` file, or a `.safetensors` file, in the
            diffusers or the kohya (A1111) format.
        scale (`float`, defaults to 1.0): the LoRA's strength: W + scale·ΔW is what the model runs.
    """

    source: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"`loras` entries must name a LoRA (hub id, folder or .safetensors), got {self.source!r}")
        object.__setattr__(self, "scale", float(self.scale))
        if not math.isfinite(self.scale):
            raise ValueError(f"`loras` scale of {self.source!r} must be a finite number, got {self.scale}")

    def __str__(self) -> str:
        return f"{self.source}:{self.scale:g}"


def parse_lora_spec(text: str) -> LoraSpec:
    """`"SPEC"` or `"SPEC:SCALE"` as a `LoraSpec`: a hub id, folder or `.safetensors` file and its scale (default 1).

    Only a number after the last colon is a scale, so `C:\\loras\\style.safetensors` stays a path.

    Raises:
        ValueError: an empty spec or a non-finite scale.
    """
    text = text.strip()
    source, colon, scale = text.rpartition(":")
    if colon and source.strip() and _is_number(scale):
        return LoraSpec(source.strip(), float(scale))
    return LoraSpec(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_finite(config: object) -> None:
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"`{item.name}` must be a finite number, got {value}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {'|'.join(choices)}, got {value!r}")


def _weighted(name: str, pairs: object, kind: type) -> tuple[tuple, ...]:
    """`pairs` as ((value, weight), ...) with weights finite, >= 0 and normalised to sum 1 (empty stays empty)."""
    what = "prompt" if kind is str else "seed"
    try:
        items = [(value, float(weight)) for value, weight in pairs]
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{name}` must be a list of [{what}, weight] pairs, got {pairs!r}") from error
    if len(items) > MAX_BLEND_ITEMS:
        raise ValueError(f"`{name}` may hold at most {MAX_BLEND_ITEMS} entries, got {len(items)}")
    for value, weight in items:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"`{name}` entries must be [{what}, weight] pairs, got {value!r} as the {what}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"`{name}` weights must be finite and >= 0, got {weight} for {value!r}")
    total = sum(weight for _, weight in items)
    if items and not total > 0:
        raise ValueError(f"`{name}` weights must not all be 0")
    return tuple((value, weight / total) for value, weight in items)


@dataclass(frozen=True)
class LoadConfig:
    """How the shared models are loaded and run; one per loaded engine, never changed by a stream.

    Args:
        model (`str`, defaults to `"demo"`): model spec: `demo` (the trained offline stylizer), `tiny`, `small`,
            `tiny-sdxl`, `sd-turbo-random` or `sdxl-turbo-random` (seeded random models of the real architectures,
            the last two at full size), a hub id, a local diffusers folder
            or a single `.safetensors` file, of the SD 1.x/2.x or the SDXL family (see `engine.models.load_models`).
        vae (`str`, defaults to `"tiny"`): `tiny` runs `AutoencoderTiny` (TAESD); `full` the model's own VAE.
        taesd (`str | None`, defaults to None): hub id or folder of a TAESD to use with a real model.
        model_config (`str | None`, defaults to None): for a single-file `model`, a local diffusers folder
            (or hub id) of the same architecture.
        device (`str`, defaults to `"auto"`): torch device; `auto` picks CUDA when present.
        dtype (`str`, defaults to `"auto"`): `float32`, `float16`, `bfloat16` or `auto` (fp16 on CUDA, else fp32).
        backend (`str`, defaults to `"auto"`): how the UNet and VAE run (`eager|onnxruntime|tensorrt|compile|auto`);
            `auto` is TensorRT where it runs, else the fastest backend measured on this machine
            (`engine.backends.auto`), eager under a memory mode. Skip policies and cross-session batching need
            an eager UNet: ask for `eager` by name for them; `auto` gives `temporal="bank"` streams the eager UNet
            too (`onnxruntime` and `tensorrt` run them when named).
        vae_backend (`str | None`, defaults to None): how the VAE runs when that differs from `backend`
            (`engine.backends.split`), e.g. `onnxruntime` beside an eager UNet, which keeps cross-session
            batching and takes ONNX Runtime's faster static-shape VAE; None runs it on `backend`.
        kv_cache (`bool`, defaults to True): serve cross-attention K/V precomputed once per prompt.
        memory (`str`, defaults to `"off"`): peak-memory mode of the shared models (`engine.memory`),
            `off|slice|group`: feature slicer or operator grouping over the batch and, at large sizes, space.
        resolution_range (`ResolutionRange | None`, defaults to None): compiled backends serve every frame
            size inside it from one dynamic-shape graph (`--resolution-range 256-1024`); None: one static
            graph per size, the faster choice for a server that keeps one size (docs/backends.md).
        loras (`tuple[LoraSpec, ...]`, defaults to none): LoRAs fused into the shared UNet and text encoders at
            load, in order, before any backend compiles them (`engine.lora`; `--lora SPEC[:SCALE]`, repeatable);
            `"SPEC[:SCALE]"` strings are parsed.
        auto_compile_budget_s (`float`, defaults to 0): `auto` also times `compile` when this is > 0, and
            never chooses it when compiling took longer than this many seconds (it compiles again at every
            start; minutes on a CPU). 0 leaves torch.compile out of `auto`.
        trt_cache_max_gb (`float | None`, defaults to None): the TensorRT engines in the cache folder take at most
            this many GB: after each build or open, the least recently used engines (not open now) are deleted.
            None keeps every engine.
        controlnet (`str | None`, defaults to None): a diffusers `ControlNetModel` of the model's family (hub id
            or local folder; `demo` is the demo model's small canny ControlNet), run on every UNet call
            (`engine.controlnet`; docs/controlnet.md).
        control_preprocessor (`str`, defaults to `"canny"`): how each input frame becomes the ControlNet's
            control image: `canny` (OpenCV), `depth` (a transformers depth-estimation model), `pose`
            (controlnet_aux's OpenPose) or `image` (the frame itself).
        control_preprocessor_model (`str | None`, defaults to None): the weights of the `depth` or `pose`
            preprocessor (hub id or folder); None takes `engine.control.sources.DEFAULT_PREPROCESSOR_MODELS`.
    """

    model: str = "demo"
    vae: str = "tiny"
    taesd: str | None = None
    model_config: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"
    vae_backend: str | None = None
    kv_cache: bool = True
    memory: str = "off"
    resolution_range: ResolutionRange | None = None
    loras: tuple[LoraSpec, ...] = ()
    auto_compile_budget_s: float = 0.0
    trt_cache_max_gb: float | None = None
    controlnet: str | None = None
    control_preprocessor: str = "canny"
    control_preprocessor_model: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "loras", tuple(
            lora if isinstance(lora, LoraSpec) else parse_lora_spec(lora) for lora in self.loras))
        if isinstance(self.resolution_range, str):
            object.__setattr__(self, "resolution_range", parse_resolution_range(self.resolution_range))
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"`model` must name a model, got {self.model!r}")
        _check_choice("vae", self.vae, VAES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("backend", self.backend, BACKENDS)
        if self.vae_backend is not None:
            _check_choice("vae_backend", self.vae_backend, BACKENDS)
        _check_choice("memory", self.memory, MEMORY_MODES)
        # `auto` resolves to eager under a memory mode (`engine.backends.auto`).
        if self.memory != "off" and (self.backend not in ("eager", "auto")
                                     or self.vae_backend not in (None, "eager", "auto")):
            raise ValueError("`memory` slices the eager modules: it needs `backend='eager'` (or `auto`) and no "
                             "other `vae_backend`")
        if not (math.isfinite(self.auto_compile_budget_s) and self.auto_compile_budget_s >= 0):
            raise ValueError(f"`auto_compile_budget_s` must be >= 0, got {self.auto_compile_budget_s}")
        if self.trt_cache_max_gb is not None and not (math.isfinite(self.trt_cache_max_gb) and
                                                      self.trt_cache_max_gb > 0):
            raise ValueError(f"`trt_cache_max_gb` must be a positive number of GB, got {self.trt_cache_max_gb}")
        if self.controlnet is not None and (not isinstance(self.controlnet, str) or not self.controlnet.strip()):
            raise ValueError(f"`controlnet` must name a ControlNet (hub id, folder or `demo`), got {self.controlnet!r}")
        _check_choice("control_preprocessor", self.control_preprocessor, CONTROL_PREPROCESSORS)
        if self.controlnet is not None and self.memory != "off":
            raise ValueError("`controlnet` adds residuals to the UNet blocks that the memory modes regroup: use "
                             "`memory='off'` with a ControlNet")

    @property
    def use_tiny_vae(self) -> bool:
        return self.vae == "tiny"

    def replace(self, **changes) -> LoadConfig:
        """A copy with `changes` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SkipSettings:
    """The tunables of the per-frame skip policies (`StreamConfig.skip_policy`; docs/skip_policies.md).

    Args:
        cut_threshold (`float`, defaults to 0.25): τ_cut: a slot whose noise-free latent changed by more than
            this relative L1 since its last full compute is computed in full (catches cuts and fast motion;
            calibrated on the trained `demo` model, docs/skip_policies.md).
        accumulated_threshold (`float`, defaults to 0.5): a slot whose frame-to-frame changes since its last
            full compute add up to more than this is computed in full (catches drift).
        max_age (`int`, defaults to 8): a slot is computed in full at the latest every this many frames.
        rehash_interval (`int`, defaults to 5): `rehash` runs each slot's deep UNet part every this many
            frames, slot phases staggered.
        adacache_codebook (`tuple[tuple[float, int], ...]`, defaults to `((0.04, 6), (0.08, 4), (0.16, 2),
            (1.0, 1))`): `adacache` maps the motion-regularised mid-block residual change per frame to frames
            until the next full compute: the first entry whose bound is >= the change; 1 beyond the last.
        adacache_motion_scale (`float`, defaults to 0.05): MoReg: the change is multiplied by
            1 + motion / this, motion being the relative L1 change of the slot's input latent.
        adacache_cross_attention_factor (`int`, defaults to 2): cross-attention residuals live this many times
            longer than the other blocks' (PAB).
    """

    cut_threshold: float = 0.25
    accumulated_threshold: float = 0.5
    max_age: int = 8
    rehash_interval: int = 5
    adacache_codebook: tuple[tuple[float, int], ...] = ((0.04, 6), (0.08, 4), (0.16, 2), (1.0, 1))
    adacache_motion_scale: float = 0.05
    adacache_cross_attention_factor: int = 2

    def __post_init__(self) -> None:
        codebook = tuple((float(bound), int(frames)) for bound, frames in self.adacache_codebook)
        object.__setattr__(self, "adacache_codebook", codebook)
        _check_finite(self)
        if self.cut_threshold <= 0 or self.accumulated_threshold <= 0:
            raise ValueError("`skip_cut_threshold` and `skip_accumulated_threshold` must be > 0")
        if self.max_age < 1 or self.rehash_interval < 1 or self.adacache_cross_attention_factor < 1:
            raise ValueError("`skip_max_age`, `rehash_interval` and `adacache_cross_attention_factor` must be >= 1")
        if self.adacache_motion_scale <= 0:
            raise ValueError(f"`adacache_motion_scale` must be > 0, got {self.adacache_motion_scale}")
        if len(codebook) > MAX_CODEBOOK_ENTRIES:
            raise ValueError(f"`adacache_codebook` may hold at most {MAX_CODEBOOK_ENTRIES} entries, "
                             f"got {len(codebook)}")
        bounds = [bound for bound, _ in codebook]
        if not codebook or bounds != sorted(bounds) or not all(map(math.isfinite, bounds)) \
                or any(frames < 1 for _, frames in codebook):
            raise ValueError(f"`adacache_codebook` must be (bound, frames >= 1) pairs with ascending bounds, "
                             f"got {self.adacache_codebook}")


#: Flat (wire) names of `SkipSettings` fields.
SKIP_PARAMS: dict[str, str] = {
    "skip_cut_threshold": "cut_threshold",
    "skip_accumulated_threshold": "accumulated_threshold",
    "skip_max_age": "max_age",
    "rehash_interval": "rehash_interval",
    "adacache_codebook": "adacache_codebook",
    "adacache_motion_scale": "adacache_motion_scale",
    "adacache_cross_attention_factor": "adacache_cross_attention_factor",
}


@dataclass(frozen=True)
class TemporalSettings:
    """The tunables of the temporal-steadiness mechanisms (`StreamConfig.temporal`; docs/temporal.md).

    Args:
        strength (`float`, defaults to 0.9): `flow`: weight of the previous output carried along the input's
            optical flow, where that flow is trusted. In [0, 1). Measured to keep detail ≥ 0.9 of off on slow
            pans while cutting their flicker (docs/temporal.md).
        feedback_strength (`float`, defaults to 0.1): `feedback`: weight of the previous x̂0 latent in the next
            input latent where the input is still. In [0, 1). On the demo model feedback made flicker worse at
            every strength measured (0.1–0.9; docs/temporal.md): 0.1 is the least harm, not a recommendation.
        tolerance (`float`, defaults to 0.2): `flow`: the carried output's weight falls as
            exp(−(d / tolerance)²), d being its mean difference from the fresh output (0-1 scale): flicker is
            a small difference and is smoothed; a large one is new structure or a misaligned edge and is kept
            sharp.
        motion_scale (`float`, defaults to 0.05): `feedback`: the weight falls as exp(−motion / this), motion
            being each latent cell's change from the previous input latent relative to the latent's mean size
            (so moving regions do not ghost).
        cut_threshold (`float`, defaults to 0.3): a frame whose input latent changed by more than this
            relative L1 from the previous one is a cut: every mechanism starts over (no ghost of the old scene).
        bank_size (`int`, defaults to 2): `bank`: frames whose self-attention keys/values are kept.
        bank_interval (`int`, defaults to 1): `bank`: a frame enters the bank every this many frames.
        injection_threshold (`float`, defaults to 0.9): `bank`: a token whose self-attention output has cosine
            similarity above this with a banked token takes part of that token's feature (feature injection).
        injection_strength (`float`, defaults to 0.5): `bank`: the banked feature's share in an injected token.
    """

    strength: float = 0.9
    feedback_strength: float = 0.1
    tolerance: float = 0.2
    motion_scale: float = 0.05
    cut_threshold: float = 0.3
    bank_size: int = 2
    bank_interval: int = 1
    injection_threshold: float = 0.9
    injection_strength: float = 0.5

    def __post_init__(self) -> None:
        _check_finite(self)
        for name in ("strength", "feedback_strength"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"`temporal_{name}` must lie in [0, 1), got {getattr(self, name)}")
        if self.motion_scale <= 0 or self.cut_threshold <= 0 or self.tolerance <= 0:
            raise ValueError("`temporal_motion_scale`, `temporal_cut_threshold` and `temporal_tolerance` must be > 0")
        if not 1 <= self.bank_size <= MAX_BANK_SIZE or self.bank_interval < 1:
            raise ValueError(f"`temporal_bank_size` must lie in [1, {MAX_BANK_SIZE}] and `temporal_bank_interval` "
                             f"be >= 1, got {self.bank_size}, {self.bank_interval}")
        if not 0 < self.injection_threshold <= 1 or not 0 <= self.injection_strength <= 1:
            raise ValueError("`temporal_injection_threshold` must lie in (0, 1] and `temporal_injection_strength` "
                             "in [0, 1]")


#: Flat (wire) names of `TemporalSettings` fields.
TEMPORAL_PARAMS: dict[str, str] = {f"temporal_{item.name}": item.name for item in dataclasses.fields(TemporalSettings)}
#: Nested settings of a `StreamConfig`: field → {flat name: attribute}.
NESTED_PARAMS: dict[str, dict[str, str]] = {"skip": SKIP_PARAMS, "temporal_settings": TEMPORAL_PARAMS}


@dataclass(frozen=True)
class StreamConfig:
    """One stream's parameters.

    Args:
        width (`int`, defaults to 256): frame width in pixels, a multiple of 8.
        height (`int`, defaults to 256): frame height in pixels, a multiple of 8.
        t_index_list (`tuple[int, ...]`, defaults to `(32, 45)`): ascending indices into the base schedule;
            one stream-batch slot (one denoising step) each.
        num_inference_steps (`int`, defaults to 50): length of the base LCM schedule.
        cfg_type (`str`, defaults to `"self"`): guidance mode, one of `none|self|initialize|full`.
        guidance_scale (`float`, defaults to 1.2): classifier-free guidance scale γ.
        delta (`float`, defaults to 1.0): RCFG scale δ of the stock (virtual residual) noise.
        frame_buffer_size (`int`, defaults to 1): frames consumed and produced per call.
        stream_batch (`bool`, defaults to True): one UNet call advances every slot; `False` runs the same
            steps one after another per frame (the baseline the stream batch must equal).
        seed (`int`, defaults to 2): seed of the fixed per-slot noise.
        prompt (`str`): the prompt the stream starts with.
        negative_prompt (`str`): the negative prompt (used by `full` and `initialize`).
        prompts (`tuple[tuple[str, float], ...]`, defaults to none): a weighted prompt blend (at most
            `MAX_BLEND_ITEMS`; weights finite, >= 0, normalised to sum 1); when given it is rendered instead of
            `prompt`, and an update naming `prompt` alone clears it.
        prompt_blend (`str`, defaults to `"linear"`): how `prompts` blend: `linear` (of the embeddings, so of
            the cached K/V) or `slerp` (spherical, per token; its K/V are projected from the blend).
        prompt_transition_frames (`int`, defaults to 0): a prompt change fades in over this many frames
            (linearly, embeddings and K/V alike); 0 switches at once.
        seeds (`tuple[tuple[int, float], ...]`, defaults to none): a weighted seed blend: the fixed noise is
            Σ w_i·ε_i / ‖w‖₂ (unit variance); when given it replaces `seed`, and an update naming `seed` alone
            clears it.
        seed_transition_frames (`int`, defaults to 0): a seed change fades over this many frames (the noise
            moves along ((1 − t)·ε_a + t·ε_b) / √((1 − t)² + t²)); 0 switches at once.
        similarity_filter (`bool`, defaults to True): stochastic similarity filter on input frames.
        similarity_threshold (`float`, defaults to 0.98): η of the similarity filter.
        max_skip_frames (`int`, defaults to 10): most consecutive frames the filter may skip.
        skip_policy (`str`, defaults to `"off"`): per-frame skip policy of the stream batch (`engine.skip`),
            one of `off|rehash|adacache`; needs an eager UNet and `stream_batch`.
        skip (`SkipSettings`): the skip policies' tunables (flat names on the wire: `SKIP_PARAMS`).
        temporal (`str`, defaults to `"off"`): temporal steadiness mechanism (`engine.temporal`), one of
            `off|feedback|bank|flow`; `off` is exactly the stream without one.
        temporal_settings (`TemporalSettings`): its tunables (flat names on the wire: `TEMPORAL_PARAMS`).
        controlnet_scale (`float`, defaults to 1.0): strength of the engine's ControlNet residuals, in
            [0, `MAX_CONTROLNET_SCALE`]; 0 is exactly the stream without a ControlNet (it is not run).
        canny_low_threshold (`float`, defaults to 100): the `canny` preprocessor's hysteresis low threshold
            (gradient magnitude of the 0-255 image).
        canny_high_threshold (`float`, defaults to 200): its high threshold, >= the low one.
        controlnet_reuse_interval (`int`, defaults to 1): recompute the ControlNet residuals at most every this
            many frames, reusing the last ones in between; 1 computes them on every frame.
        controlnet_reuse_threshold (`float`, defaults to 0.05): ...unless the newest control image moved more
            than this (mean absolute change in [0, 1]) since the residuals were computed.
        show_control (`bool`, defaults to False): output each frame's control image instead of the restyled
            frame (to see what the ControlNet follows).
    """

    width: int = 256
    height: int = 256
    t_index_list: tuple[int, ...] = (32, 45)
    num_inference_steps: int = 50
    cfg_type: CfgType = "self"
    guidance_scale: float = 1.2
    delta: float = 1.0
    frame_buffer_size: int = 1
    stream_batch: bool = True
    seed: int = 2
    prompt: str = "a watercolor painting, soft light"
    negative_prompt: str = "low quality, blurry"
    prompts: tuple[tuple[str, float], ...] = ()
    prompt_blend: PromptBlend = "linear"
    prompt_transition_frames: int = 0
    seeds: tuple[tuple[int, float], ...] = ()
    seed_transition_frames: int = 0
    similarity_filter: bool = True
    similarity_threshold: float = 0.98
    max_skip_frames: int = 10
    skip_policy: str = "off"
    skip: SkipSettings = field(default_factory=SkipSettings)
    temporal: str = "off"
    temporal_settings: TemporalSettings = field(default_factory=TemporalSettings)
    controlnet_scale: float = 1.0
    canny_low_threshold: float = 100.0
    canny_high_threshold: float = 200.0
    controlnet_reuse_interval: int = 1
    controlnet_reuse_threshold: float = 0.05
    show_control: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_index_list", tuple(int(t) for t in self.t_index_list))
        object.__setattr__(self, "prompts", _weighted("prompts", self.prompts, str))
        object.__setattr__(self, "seeds", _weighted("seeds", self.seeds, int))
        _check_finite(self)
        if self.width <= 0 or self.width % 8 or self.height <= 0 or self.height % 8:
            raise ValueError(f"`width` and `height` must be positive multiples of 8, got {self.width}x{self.height}")
        if not self.t_index_list:
            raise ValueError("`t_index_list` must name at least one step")
        if list(self.t_index_list) != sorted(set(self.t_index_list)):
            raise ValueError(f"`t_index_list` must be strictly ascending, got {list(self.t_index_list)}")
        if self.t_index_list[0] < 0 or self.t_index_list[-1] >= self.num_inference_steps:
            raise ValueError(
                f"`t_index_list` entries must lie in [0, {self.num_inference_steps}), got {list(self.t_index_list)}"
            )
        _check_choice("cfg_type", self.cfg_type, CFG_TYPES)
        if self.frame_buffer_size < 1:
            raise ValueError(f"`frame_buffer_size` must be >= 1, got {self.frame_buffer_size}")
        if not 0.0 < self.similarity_threshold < 1.0:
            raise ValueError(f"`similarity_threshold` must lie in (0, 1), got {self.similarity_threshold}")
        if self.max_skip_frames < 0:
            raise ValueError(f"`max_skip_frames` must be >= 0, got {self.max_skip_frames}")
        _check_choice("skip_policy", self.skip_policy, SKIP_POLICIES)
        if self.skip_policy != "off" and not self.stream_batch:
            raise ValueError("`skip_policy` works on the stream batch: it needs `stream_batch=True`")
        _check_choice("prompt_blend", self.prompt_blend, PROMPT_BLENDS)
        if len({seed for seed, _ in self.seeds}) != len(self.seeds):
            raise ValueError(f"`seeds` must name each seed once, got {[seed for seed, _ in self.seeds]}")
        for name in ("prompt_transition_frames", "seed_transition_frames"):
            if not 0 <= getattr(self, name) <= MAX_TRANSITION_FRAMES:
                raise ValueError(f"`{name}` must lie in [0, {MAX_TRANSITION_FRAMES}], got {getattr(self, name)}")
        _check_choice("temporal", self.temporal, TEMPORAL_MODES)
        if not 0 <= self.controlnet_scale <= MAX_CONTROLNET_SCALE:
            raise ValueError(f"`controlnet_scale` must lie in [0, {MAX_CONTROLNET_SCALE:g}], "
                             f"got {self.controlnet_scale}")
        if not 0 <= self.canny_low_threshold <= self.canny_high_threshold <= 1000:
            raise ValueError("`canny_low_threshold` and `canny_high_threshold` must satisfy 0 <= low <= high <= 1000, "
                             f"got {self.canny_low_threshold} and {self.canny_high_threshold}")
        if not 1 <= self.controlnet_reuse_interval <= MAX_CONTROLNET_REUSE_INTERVAL:
            raise ValueError(f"`controlnet_reuse_interval` must lie in [1, {MAX_CONTROLNET_REUSE_INTERVAL}], "
                             f"got {self.controlnet_reuse_interval}")
        if not 0 <= self.controlnet_reuse_threshold <= 1:
            raise ValueError(f"`controlnet_reuse_threshold` must lie in [0, 1], got {self.controlnet_reuse_threshold}")

    @property
    def denoising_steps(self) -> int:
        """Number of stream-batch slots n."""
        return len(self.t_index_list)

    @property
    def weighted_prompts(self) -> tuple[tuple[str, float], ...]:
        """What the stream renders: `prompts`, or `prompt` alone with weight 1."""
        return self.prompts or ((self.prompt, 1.0),)

    @property
    def weighted_seeds(self) -> tuple[tuple[int, float], ...]:
        """Where the fixed noise comes from: `seeds`, or `seed` alone with weight 1."""
        return self.seeds or ((self.seed, 1.0),)

    def replace(self, **changes) -> StreamConfig:
        """A copy with `changes` applied (validated like the constructor); `skip` replaces the settings whole."""
        return dataclasses.replace(self, **changes)

    def updated(self, **params) -> StreamConfig:
        """A copy with parameters given by their flat (wire) names, the nested settings' (`NESTED_PARAMS`) included.

        Raises:
            ValueError: an unknown name (load-time settings are named as such), or an invalid value.
        """
        unknown = set(params) - set(STREAM_PARAM_TYPES)
        if unknown:
            load_time = sorted(unknown & LOAD_SETTINGS)
            if load_time:
                raise ValueError(f"{', '.join(f'`{name}`' for name in load_time)} is a load-time setting of the "
                                 "server: it is fixed for every stream and cannot change per session")
            raise ValueError(f"unknown stream parameter(s) {sorted(unknown)}; known: {sorted(STREAM_PARAM_TYPES)}")
        for name, value in params.items():
            if not _has_type(value, STREAM_PARAM_TYPES[name]):
                raise ValueError(f"`{name}` must be {_type_name(STREAM_PARAM_TYPES[name])}, got {value!r:.80}")
        own = {name: value for name, value in params.items()
               if not any(name in names for names in NESTED_PARAMS.values())}
        for group, names in NESTED_PARAMS.items():
            nested = {names[name]: value for name, value in params.items() if name in names}
            if nested:
                own[group] = dataclasses.replace(getattr(self, group), **nested)
        # A plain prompt (or seed) replaces a blend: a client that knows nothing of blends stays in control.
        for single, blend in (("prompt", "prompts"), ("seed", "seeds")):
            if single in own and blend not in own:
                own[blend] = ()
        return dataclasses.replace(self, **own)

    def flat_params(self) -> dict[str, Any]:
        """Every parameter by its flat (wire) name."""
        params = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)
                  if item.name not in NESTED_PARAMS}
        for group, names in NESTED_PARAMS.items():
            params.update({name: getattr(getattr(self, group), attribute) for name, attribute in names.items()})
        return params


def _flat_types() -> dict[str, Any]:
    stream = get_type_hints(StreamConfig)
    types = {name: hint for name, hint in stream.items() if name not in NESTED_PARAMS}
    for group, names in NESTED_PARAMS.items():
        hints = get_type_hints(stream[group])
        types.update({name: hints[attribute] for name, attribute in names.items()})
    return types


def _has_type(value: Any, kind: Any) -> bool:
    """Whether `value` is of parameter type `kind` (int, float, bool, str, a `Literal`, or tuples of them; a list
    passes for a tuple and an int for a float, as JSON gives them)."""
    origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        return any(value == option and type(value) is type(option) for option in args)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_has_type(item, args[0]) for item in value)
        return len(value) == len(args) and all(_has_type(item, arg) for item, arg in zip(value, args, strict=True))
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    origin, args = get_origin(kind), get_args(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(option) for option in args)
    if origin is tuple and args[1:] == (Ellipsis,):
        return "a list of " + _type_name(args[0])
    if origin is tuple:
        return "[" + ", ".join(_type_name(arg) for arg in args) + "]"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


#: Each stream parameter's flat name and type (what the server's protocol validates against).
STREAM_PARAM_TYPES: dict[str, Any] = _flat_types()
#: Names of the load-time settings (`LoadConfig`), which no stream may change.
LOAD_SETTINGS: frozenset[str] = frozenset(item.name for item in dataclasses.fields(LoadConfig))
#: Parameters that can change between two frames without re-preparing the stream.
HOT_PARAMS: frozenset[str] = frozenset(
    {"prompt", "negative_prompt", "guidance_scale", "delta", "seed", "similarity_filter", "similarity_threshold",
     "max_skip_frames", "skip_policy", *SKIP_PARAMS, "temporal", *TEMPORAL_PARAMS, "prompts", "prompt_blend",
     "prompt_transition_frames", "seeds", "seed_transition_frames", "controlnet_scale", "canny_low_threshold",
     "canny_high_threshold", "controlnet_reuse_interval", "controlnet_reuse_threshold", "show_control"}
)
#: Parameters whose change rebuilds schedule, noise and buffer (a clean re-prepare).
REPREPARE_PARAMS: frozenset[str] = frozenset({"t_index_list", "width", "height"})
#: The frame size: a live stream may change it (a re-prepare), but a server session keeps the size its `hello` named.
SIZE_PARAMS: frozenset[str] = frozenset({"width", "height"})


def live_params(size_fixed: bool = False) -> frozenset[str]:
    """The parameters a live stream may change (`StreamEngine.update_params` refuses any other): the hot ones and
    those that re-prepare it; without the frame size when `size_fixed` (a server session)."""
    live = HOT_PARAMS | REPREPARE_PARAMS
    return live - SIZE_PARAMS if size_fixed else live


@dataclass(frozen=True)
class RuntimeOptions:
    """How the runtime serves its streams.

    Args:
        jpeg_quality (`int`, defaults to 85): quality of output JPEGs.
        max_pixels (`int`, defaults to `DEFAULT_MAX_PIXELS`): largest accepted input image.
        max_batch (`int`, defaults to 4): most frames, each from a different stream, advanced by one batched
            UNet call (`engine.batching`); 1 serves one frame at a time. 4 won every measured configuration
            (docs/batching.md) and costs nothing with one stream.
        batch_wait_s (`float`, defaults to 0): how long a partial batch may wait for frames that are still in
            the input stage of batch-compatible streams; the wait ends as soon as the batch is full or nothing
            more is coming, so a lone stream never waits.
    """

    jpeg_quality: int = 85
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int = 4
    batch_wait_s: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"`jpeg_quality` must lie in [1, 100], got {self.jpeg_quality}")
        if self.max_pixels < 1 or self.max_batch < 1:
            raise ValueError(f"`max_pixels` and `max_batch` must be >= 1, got {self.max_pixels}, {self.max_batch}")
        if not self.batch_wait_s >= 0:
            raise ValueError(f"`batch_wait_s` must be >= 0, got {self.batch_wait_s}")


def check_compatible(load: LoadConfig, stream: StreamConfig) -> None:
    """Raise `ValueError` when a stream's parameters cannot run on engines loaded with `load`."""
    if load.memory == "group" and stream.skip_policy != "off":
        raise ValueError("`memory='group'` runs whole blocks per row, which the skip policies' per-row caches do "
                         "not follow: use `memory='slice'` or `skip_policy='off'`")
    if load.controlnet is not None and stream.skip_policy != "off":
        raise ValueError("the skip policies reuse UNet features that a ControlNet's residuals change on every frame: "
                         "use `skip_policy='off'` with a ControlNet")
    if load.memory != "off" and stream.temporal == "bank":
        raise ValueError("`temporal='bank'` extends the self-attention that the memory modes slice: use "
                         "`memory='off'` or another `temporal` mechanism")
