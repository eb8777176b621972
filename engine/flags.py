"""One flag vocabulary for every command that configures the engine (server, build, doctor, benchmarks).

Each flag names one field of `LoadConfig`, `StreamConfig` (flat names) or `RuntimeOptions`; defaults are not
restated here, they come from those dataclasses. `add_flags` puts flags on an argparse parser (default
`None`, so "not given" leaves the dataclass default), `configs_from` turns the given values into configs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .config import (
    BACKENDS,
    CFG_TYPES,
    CONTROL_PREPROCESSORS,
    DTYPES,
    MEMORY_MODES,
    SKIP_POLICIES,
    VAES,
    LoadConfig,
    StreamConfig,
    parse_lora_spec,
    parse_resolution_range,
)

Owner = Literal["load", "stream", "runtime"]


def int_list(text: str) -> tuple[int, ...]:
    """`"32,45"` → `(32, 45)`."""
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,45, got {text!r}") from error


def str_list(text: str) -> tuple[str, ...]:
    """`"a, b"` → `("a", "b")`."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def boolean(text: str) -> bool:
    """`true/false`, `1/0`, `yes/no`, `on/off`."""
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def resolution_range(text: str):
    """`"256-1024[:512]"` → a `ResolutionRange` (argparse shows the parser's own message when it is wrong)."""
    try:
        return parse_resolution_range(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def lora_spec(text: str):
    """`"SPEC[:SCALE]"` → a `LoraSpec` (hub id, folder or `.safetensors` file, scale 1 by default)."""
    try:
        return parse_lora_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def split_repeated(text: str) -> list[str]:
    """The values of a repeatable flag given once, e.g. in an environment variable: `"a:0.5;b"` → `["a:0.5", "b"]`
    (`;` or `,` separate them)."""
    return [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]


def milliseconds(text: str) -> float:
    """Milliseconds on the command line → seconds in the config."""
    return float(text) / 1000


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the config field it sets.

    Args:
        flags (`tuple[str, ...]`): the flag and its aliases, e.g. `("--cfg-type", "--guidance")`.
        dest (`str`): the field (a flat stream-parameter name for `stream`).
        owner (`str`): `load`, `stream`, `runtime` (`RuntimeOptions`) or another owner of the caller's.
        type (`Callable[[str], object]`): parses the text.
        help (`str`): one line.
        choices (`Sequence[str] | None`): allowed values.
        boolean (`bool`): a `--flag/--no-flag` pair instead of a value.
        repeatable (`bool`): may be given several times; the values make a list (`split_repeated` reads one
            text holding several).
    """

    flags: tuple[str, ...]
    dest: str
    owner: str
    type: Callable[[str], object]
    help: str
    choices: Sequence[str] | None = None
    boolean: bool = False
    repeatable: bool = False


ENGINE_FLAGS: tuple[Flag, ...] = (
    Flag(("--model",), "model", "load", str,
         "model spec: demo, tiny, small, tiny-sdxl, a hub id, a diffusers folder or a .safetensors file (SD or SDXL)"),
    Flag(("--model-config",), "model_config", "load", str,
         "for a single-file --model: a diffusers folder or hub id of the same architecture"),
    Flag(("--vae",), "vae", "load", str, "which VAE runs: the tiny VAE (TAESD) or the model's own", VAES),
    Flag(("--taesd",), "taesd", "load", str, "hub id or folder of the TAESD to use with a real model"),
    Flag(("--device",), "device", "load", str, "torch device (auto picks CUDA when present)"),
    Flag(("--dtype",), "dtype", "load", str, "model precision (auto: float16 on CUDA, else float32)", DTYPES),
    Flag(("--backend",), "backend", "load", str, "how the networks run", BACKENDS),
    Flag(("--vae-backend",), "vae_backend", "load", str,
         "how the VAE runs when not on --backend, e.g. onnxruntime beside an eager UNet that batches sessions",
         BACKENDS),
    Flag(("--kv-cache",), "kv_cache", "load", boolean, "precompute cross-attention K/V once per prompt",
         boolean=True),
    Flag(("--memory",), "memory", "load", str, "peak-memory mode for large frames (docs/memory.md)", MEMORY_MODES),
    Flag(("--trt-cache-max-gb",), "trt_cache_max_gb", "load", float,
         "GB the TensorRT engines of the cache may take; the least recently used go first (default: no bound)"),
    Flag(("--auto-compile-budget",), "auto_compile_budget_s", "load", float,
         "seconds --backend auto may spend compiling with torch.compile to time it (0: leave compile out)"),
    Flag(("--resolution-range",), "resolution_range", "load", resolution_range,
         "MIN-MAX[:OPT] pixels: compiled backends serve every size inside from one dynamic-shape graph"),
    Flag(("--lora",), "loras", "load", lora_spec,
         "SPEC[:SCALE]: a LoRA (hub id, folder or .safetensors) fused into the model at load; repeatable",
         repeatable=True),
    Flag(("--controlnet",), "controlnet", "load", str,
         "a ControlNet run on every frame: demo (the demo model's canny ControlNet), random, a folder or a hub id"),
    Flag(("--control-preprocessor",), "control_preprocessor", "load", str,
         "how each frame becomes the ControlNet's control image", CONTROL_PREPROCESSORS),
    Flag(("--control-preprocessor-model",), "control_preprocessor_model", "load", str,
         "weights of the depth or pose preprocessor (hub id or folder)"),
    Flag(("--width",), "width", "stream", int, "frame width in pixels (multiple of 8)"),
    Flag(("--height",), "height", "stream", int, "frame height in pixels (multiple of 8)"),
    Flag(("--t-index-list",), "t_index_list", "stream", int_list, "denoising steps as schedule indices, e.g. 32,45"),
    Flag(("--cfg-type", "--guidance"), "cfg_type", "stream", str, "guidance mode", CFG_TYPES),
    Flag(("--guidance-scale",), "guidance_scale", "stream", float, "classifier-free guidance scale"),
    Flag(("--frame-buffer-size",), "frame_buffer_size", "stream", int, "frames per stream-batch call"),
    Flag(("--seed",), "seed", "stream", int, "seed of each stream's fixed noise"),
    Flag(("--prompt",), "prompt", "stream", str, "prompt every stream starts with"),
    Flag(("--negative-prompt",), "negative_prompt", "stream", str, "negative prompt every stream starts with"),
    Flag(("--similarity-filter",), "similarity_filter", "stream", boolean, "skip near-identical input frames",
         boolean=True),
    Flag(("--skip-policy",), "skip_policy", "stream", str, "per-frame skip policy (docs/skip_policies.md)",
         SKIP_POLICIES),
    Flag(("--controlnet-scale",), "controlnet_scale", "stream", float,
         "strength of the ControlNet's residuals each stream starts with (0: not run)"),
    Flag(("--controlnet-reuse-interval",), "controlnet_reuse_interval", "stream", int,
         "recompute the ControlNet residuals at most every N frames while the control image barely moves"),
    Flag(("--max-batch",), "max_batch", "runtime", int,
         "most sessions' frames per batched network call (1 = one at a time)"),
    Flag(("--batch-wait-ms",), "batch_wait_s", "runtime", milliseconds,
         "how long a partial batch may wait for other sessions' frames still being decoded (0 = never)"),
    Flag(("--max-pixels",), "max_pixels", "runtime", int, "largest input image in pixels"),
    Flag(("--jpeg-quality",), "jpeg_quality", "runtime", int, "quality of output JPEGs"),
)


def engine_flags(*owners: Owner, exclude: Iterable[str] = ()) -> tuple[Flag, ...]:
    """The engine flags of `owners`, without the destinations in `exclude`."""
    excluded = set(exclude)
    return tuple(flag for flag in ENGINE_FLAGS if flag.owner in owners and flag.dest not in excluded)


def add_flags(parser: argparse.ArgumentParser, flags: Iterable[Flag],
              describe: Callable[[Flag], str] | None = None) -> None:
    """Add `flags` to `parser` with default None ("not given"); `describe` may extend each help line."""
    for flag in flags:
        help_text = flag.help if describe is None else describe(flag)
        if flag.boolean:
            parser.add_argument(*flag.flags, dest=flag.dest, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        elif flag.repeatable:
            parser.add_argument(*flag.flags, dest=flag.dest, type=flag.type, choices=flag.choices, default=None,
                                action="append", help=help_text)
        else:
            parser.add_argument(*flag.flags, dest=flag.dest, type=flag.type, choices=flag.choices, default=None,
                                help=help_text)


def configs_from(values: Mapping[str, object], load: LoadConfig | None = None,
                 stream: StreamConfig | None = None) -> tuple[LoadConfig, StreamConfig, dict[str, object]]:
    """`LoadConfig` and `StreamConfig` with the given (non-None) engine flag values applied over `load` and
    `stream` (default: the dataclass defaults), and the runtime options given, as keyword arguments.

    Raises:
        ValueError: an invalid value (the message names the field).
    """
    owners = {flag.dest: flag.owner for flag in ENGINE_FLAGS}
    given = {name: value for name, value in values.items() if value is not None and name in owners}
    load = (load or LoadConfig()).replace(**{k: v for k, v in given.items() if owners[k] == "load"})
    stream = (stream or StreamConfig()).updated(**{k: v for k, v in given.items() if owners[k] == "stream"})
    runtime = {k: v for k, v in given.items() if owners[k] == "runtime"}
    return load, stream, runtime
