"""Typed engine configuration: the one source of every engine default."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

CfgType = Literal["none", "self", "initialize", "full"]
CFG_TYPES: tuple[str, ...] = ("none", "self", "initialize", "full")
BACKENDS: tuple[str, ...] = ("eager", "onnxruntime", "tensorrt", "compile", "auto")
SKIP_POLICIES: tuple[str, ...] = ("off", "rehash", "adacache")
MEMORY_MODES: tuple[str, ...] = ("off", "slice", "group")
#: Most entries of `adacache_codebook`.
MAX_CODEBOOK_ENTRIES = 16

# Parameters that can change between two frames without re-preparing the stream.
HOT_PARAMS: frozenset[str] = frozenset(
    {"prompt", "negative_prompt", "guidance_scale", "delta", "seed", "similarity_filter",
     "similarity_threshold", "max_skip_frames", "skip_policy", "skip_cut_threshold", "skip_accumulated_threshold",
     "skip_max_age", "rehash_interval", "adacache_codebook", "adacache_motion_scale", "adacache_cross_attention_factor"}
)
# Parameters whose change rebuilds schedule, noise and buffer (a clean re-prepare).
REPREPARE_PARAMS: frozenset[str] = frozenset({"t_index_list", "width", "height"})


@dataclass(frozen=True)
class EngineConfig:
    """Everything that defines one streaming engine.

    Args:
        model (`str`, defaults to `"tiny"`): model spec: `tiny`, `small`, a hub id, a local diffusers
            folder or a single `.safetensors` file (see `engine.models.load_models`).
        width (`int`, defaults to 256): output width in pixels, a multiple of 8.
        height (`int`, defaults to 256): output height in pixels, a multiple of 8.
        t_index_list (`tuple[int, ...]`, defaults to `(32, 45)`): ascending indices into the base
            schedule; one stream-batch slot (one denoising step) each.
        num_inference_steps (`int`, defaults to 50): length of the base LCM schedule.
        cfg_type (`str`, defaults to `"self"`): guidance mode, one of `none|self|initialize|full`.
        guidance_scale (`float`, defaults to 1.2): classifier-free guidance scale γ.
        delta (`float`, defaults to 1.0): RCFG scale δ of the stock (virtual residual) noise.
        frame_buffer_size (`int`, defaults to 1): frames consumed and produced per call.
        stream_batch (`bool`, defaults to True): one UNet call advances every slot; `False` runs the
            same steps one after another per frame (the baseline the stream batch must equal).
        seed (`int`, defaults to 2): seed of the fixed per-slot noise.
        dtype (`str`, defaults to `"auto"`): `float32`, `float16` or `auto` (fp16 on CUDA, else fp32).
        device (`str`, defaults to `"auto"`): torch device, `auto` picks CUDA when present.
        backend (`str`, defaults to `"eager"`): how the UNet and VAE run.
        vae_backend (`str | None`, defaults to None): how the VAE encoder and decoder run when that differs
            from `backend` (`engine.backends.split`), e.g. `onnxruntime` beside an eager UNet, which keeps
            cross-session batching and takes ONNX Runtime's faster static-shape VAE; None runs them on `backend`.
        use_tiny_vae (`bool`, defaults to True): use `AutoencoderTiny` (TAESD) instead of the full VAE.
        taesd (`str | None`, defaults to None): hub id or folder of a TAESD to use with a real model.
        model_config (`str | None`, defaults to None): for a single-file `model`, a local diffusers folder
            of the same architecture (`engine.models.load_models(config=...)`).
        use_kv_cache (`bool`, defaults to True): serve cross-attention K/V precomputed per prompt.
        similarity_filter (`bool`, defaults to True): stochastic similarity filter on input frames.
        similarity_threshold (`float`, defaults to 0.98): η of the similarity filter.
        max_skip_frames (`int`, defaults to 10): most consecutive frames the filter may skip.
        prompt (`str`): the prompt the stream starts with.
        negative_prompt (`str`): the negative prompt (used by `full` and `initialize`).
        skip_policy (`str`, defaults to `"off"`): per-frame skip policy of the stream batch (`engine.skip`),
            one of `off|rehash|adacache`; needs an eager UNet (`backend='eager'`) and `stream_batch`.
        skip_cut_threshold (`float`, defaults to 0.25): τ_cut: a slot whose noise-free latent changed by more
            than this relative L1 since its last full compute is computed in full (catches cuts and fast
            motion). Calibrated on the trained `demo` model (docs/skip_policies.md): a one-pixel pan adds
            0.04-0.10 per frame to slot 0's change, fast motion is at 0.9-1.2, a cut adds about 0.45 at once.
        skip_accumulated_threshold (`float`, defaults to 0.5): a slot whose frame-to-frame changes since its
            last full compute add up to more than this is computed in full (catches drift).
        skip_max_age (`int`, defaults to 8): a slot is computed in full at the latest every this many frames.
        rehash_interval (`int`, defaults to 5): `rehash` runs each slot's deep UNet part every this many
            frames, slot phases staggered (5 keeps the trained `demo` model's slow pan above 35 dB).
        adacache_codebook (`tuple[tuple[float, int], ...]`, defaults to `((0.04, 6), (0.08, 4), (0.16, 2),
            (1.0, 1))`): `adacache` maps the motion-regularised mid-block residual change per frame to frames
            until the next full compute: the first entry whose bound is >= the change; 1 beyond the last.
        adacache_motion_scale (`float`, defaults to 0.05): MoReg: the change is multiplied by
            1 + motion / this, motion being the relative L1 change of the slot's input latent.
        adacache_cross_attention_factor (`int`, defaults to 2): cross-attention residuals live this many times
            longer than the other blocks' (PAB).
        memory (`str`, defaults to `"off"`): peak-memory mode of the shared models (`engine.memory`), one of
            `off|slice|group`: feature slicer or operator grouping over the batch and, at large sizes, space.
    """

    model: str = "tiny"
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
    dtype: str = "auto"
    device: str = "auto"
    backend: str = "eager"
    vae_backend: str | None = None
    use_tiny_vae: bool = True
    taesd: str | None = None
    model_config: str | None = None
    use_kv_cache: bool = True
    similarity_filter: bool = True
    similarity_threshold: float = 0.98
    max_skip_frames: int = 10
    prompt: str = "a watercolor painting, soft light"
    negative_prompt: str = "low quality, blurry"
    skip_policy: str = "off"
    skip_cut_threshold: float = 0.25
    skip_accumulated_threshold: float = 0.5
    skip_max_age: int = 8
    rehash_interval: int = 5
    adacache_codebook: tuple[tuple[float, int], ...] = ((0.04, 6), (0.08, 4), (0.16, 2), (1.0, 1))
    adacache_motion_scale: float = 0.05
    adacache_cross_attention_factor: int = 2
    memory: str = "off"

    def __post_init__(self) -> None:
        object.__setattr__(self, "t_index_list", tuple(int(t) for t in self.t_index_list))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{field.name}` must be a finite number, got {value}")
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
        if self.cfg_type not in CFG_TYPES:
            raise ValueError(f"`cfg_type` must be one of {CFG_TYPES}, got {self.cfg_type!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {BACKENDS}, got {self.backend!r}")
        if self.vae_backend is not None and self.vae_backend not in BACKENDS:
            raise ValueError(f"`vae_backend` must be None or one of {BACKENDS}, got {self.vae_backend!r}")
        if self.frame_buffer_size < 1:
            raise ValueError(f"`frame_buffer_size` must be >= 1, got {self.frame_buffer_size}")
        if not 0.0 < self.similarity_threshold < 1.0:
            raise ValueError(f"`similarity_threshold` must lie in (0, 1), got {self.similarity_threshold}")
        if self.max_skip_frames < 0:
            raise ValueError(f"`max_skip_frames` must be >= 0, got {self.max_skip_frames}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"`dtype` must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        self._validate_skip_policy()
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"`memory` must be one of {MEMORY_MODES}, got {self.memory!r}")
        if self.memory != "off" and (self.backend != "eager" or self.vae_backend not in (None, "eager")):
            raise ValueError("`memory` slices the eager modules: it needs `backend='eager'` and no other "
                             "`vae_backend`")
        if self.memory == "group" and self.skip_policy != "off":
            raise ValueError("`memory='group'` runs whole blocks per row, which the skip policies' per-row "
                             "caches do not follow: use `memory='slice'` or `skip_policy='off'`")

    def _validate_skip_policy(self) -> None:
        codebook = tuple((float(bound), int(frames)) for bound, frames in self.adacache_codebook)
        object.__setattr__(self, "adacache_codebook", codebook)
        if self.skip_policy not in SKIP_POLICIES:
            raise ValueError(f"`skip_policy` must be one of {SKIP_POLICIES}, got {self.skip_policy!r}")
        if self.skip_policy != "off" and not self.stream_batch:
            raise ValueError("`skip_policy` works on the stream batch: it needs `stream_batch=True`")
        if self.skip_cut_threshold <= 0 or self.skip_accumulated_threshold <= 0:
            raise ValueError("`skip_cut_threshold` and `skip_accumulated_threshold` must be > 0")
        if self.skip_max_age < 1 or self.rehash_interval < 1 or self.adacache_cross_attention_factor < 1:
            raise ValueError("`skip_max_age`, `rehash_interval` and `adacache_cross_attention_factor` must be >= 1")
        if self.adacache_motion_scale <= 0:
            raise ValueError(f"`adacache_motion_scale` must be > 0, got {self.adacache_motion_scale}")
        bounds = [bound for bound, _ in codebook]
        if len(codebook) > MAX_CODEBOOK_ENTRIES:
            raise ValueError(f"`adacache_codebook` may hold at most {MAX_CODEBOOK_ENTRIES} entries, "
                             f"got {len(codebook)}")
        if not codebook or bounds != sorted(bounds) or not all(map(math.isfinite, bounds)) \
                or any(frames < 1 for _, frames in codebook):
            raise ValueError(f"`adacache_codebook` must be (bound, frames >= 1) pairs with ascending bounds, "
                             f"got {self.adacache_codebook}")

    @property
    def denoising_steps(self) -> int:
        """Number of stream-batch slots n."""
        return len(self.t_index_list)

    def replace(self, **changes) -> EngineConfig:
        """A copy with `changes` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)
