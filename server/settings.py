"""Server settings: command-line flags over `STREAMDIFF_*` environment variables over defaults.

Engine defaults live in `engine.EngineConfig` only; a flag or variable that is not given leaves the
engine field at its `EngineConfig` default.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from engine import EngineConfig
from engine.codec import DEFAULT_MAX_PIXELS
from engine.config import BACKENDS, CFG_TYPES, MEMORY_MODES, SKIP_POLICIES

ENV_PREFIX = "STREAMDIFF_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: A replica id is the session-id prefix a proxy routes on (`deploy/nginx.conf`), so it stays URL- and
#: nginx-name-safe.
REPLICA_ID_PATTERN = re.compile(r"[a-z0-9]{1,16}")


@dataclass(frozen=True)
class ServerSettings:
    """Everything that configures one server process.

    Args:
        engine (`EngineConfig`): the engine configuration every session starts from.
        host (`str`, defaults to `"127.0.0.1"`): interface to bind; loopback unless told otherwise.
        port (`int`, defaults to 8000): TCP port (0 picks a free one).
        max_sessions (`int`, defaults to 4): concurrent WebSocket sessions; more are closed with 1013.
        max_in_flight (`int`, defaults to 2): frames a session may have accepted but not yet answered.
        max_batch (`int`, defaults to 4): most sessions' frames advanced by one batched UNet call
            (`engine.batching`); 1 serves one frame at a time. 4 gave 1.26-1.33x the aggregate FPS of 1 at
            4 streams on the tiny model here (docs/batching.md) and costs nothing with one session.
        batch_wait_ms (`float`, defaults to 0): how long a partial batch may wait for other sessions' frames
            still in the input stage (`StreamRuntime`'s `batch_wait_s`); 0 takes whatever is ready.
        max_message_bytes (`int`, defaults to 8 MiB): largest binary WebSocket message (a frame); larger ones
            close with 1009.
        max_control_bytes (`int`, defaults to 16 KiB): largest control message: a WebSocket text message
            (larger ones close with 1009) or a REST request body (larger ones get 413 before they are read).
        max_prompt_chars (`int`, defaults to 1000): longest prompt or negative prompt, in characters.
        max_pixels (`int`, defaults to `engine.codec.DEFAULT_MAX_PIXELS`): largest input image, in pixels.
        token (`str | None`, defaults to None): when set, required on WebSocket and REST calls. An empty
            string is refused: unset the variable to run without a token.
        cors_origins (`tuple[str, ...]`, defaults to empty): origins allowed by CORS, and the only other
            origins (besides the server's own) whose browser pages may open a WebSocket; empty turns CORS off.
        allowed_hosts (`tuple[str, ...]`, defaults to empty): `Host` header values (names, without port) the
            server answers; empty means `localhost`, `127.0.0.1` and `::1` when bound to loopback (against DNS
            rebinding) and any host otherwise; `*` allows any.
        insecure (`bool`, defaults to False): allow binding a non-loopback interface without a token.
        idle_timeout_s (`float`, defaults to 15): a WebSocket session that sends neither frame nor message for
            this long, with no frame in flight, is closed (4408) so it cannot hold a slot.
        header_timeout_s (`float`, defaults to 5): an HTTP connection whose request headers are not complete
            this long after its first byte (or its opening) is closed.
        max_connections (`int`, defaults to 256): open TCP connections (HTTP and WebSocket) at most; more are
            closed at once, so a flood cannot exhaust the process's file descriptors.
        jpeg_quality (`int`, defaults to 85): quality of output JPEGs.
        stats_interval_s (`float`, defaults to 1.0): seconds between `stats` events of an active session.
        degraded_latency_s (`float`, defaults to 10.0): end-to-end latency above which `/health` says degraded.
        warmup (`bool`, defaults to True): run one frame through the model before reporting `ready`.
        log_level (`str`, defaults to `"info"`): logging level name.
        replica_id (`str`, defaults to `""`): when set, every session id starts with `<replica_id>-`, so a
            proxy in front of several replicas can send a session's REST calls to the replica that owns it.
        threads (`int`, defaults to 0): torch intra-op threads of each model thread (the runtime runs three
            at once: two input threads with the VAE encoder, UNet, VAE decode); 0 shares the cores among them
            (cores // 4, at least 1).
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 4
    max_in_flight: int = 2
    max_batch: int = 4
    batch_wait_ms: float = 0.0
    max_message_bytes: int = 8 * 1024 * 1024
    max_control_bytes: int = 16 * 1024
    max_prompt_chars: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    insecure: bool = False
    idle_timeout_s: float = 15.0
    header_timeout_s: float = 5.0
    max_connections: int = 256
    jpeg_quality: int = 85
    stats_interval_s: float = 1.0
    degraded_latency_s: float = 10.0
    warmup: bool = True
    log_level: str = "info"
    replica_id: str = ""
    threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "allowed_hosts", tuple(host.lower() for host in self.allowed_hosts))
        if self.token is not None and not self.token.strip():
            raise ValueError("`token` is empty: set a real token, or unset it (STREAMDIFF_TOKEN) to run without one")
        if not self.insecure and self.token is None and not is_loopback(self.host):
            raise ValueError(f"refusing to listen on {self.host} without a token: anyone who can reach it could "
                             "stream. Set STREAMDIFF_TOKEN (or --token), or pass --insecure to allow it")
        for name in ("max_sessions", "max_in_flight", "max_batch", "max_message_bytes", "max_control_bytes",
                     "max_prompt_chars", "max_pixels", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ValueError(f"`batch_wait_ms` must be >= 0, got {self.batch_wait_ms}")
        if self.threads < 0:
            raise ValueError(f"`threads` must be >= 0 (0 = share the cores), got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"`port` must lie in [0, 65535], got {self.port}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"`jpeg_quality` must lie in [1, 100], got {self.jpeg_quality}")
        for name in ("stats_interval_s", "degraded_latency_s", "idle_timeout_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"`log_level` must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.replica_id and REPLICA_ID_PATTERN.fullmatch(self.replica_id) is None:
            raise ValueError(f"`replica_id` must be 1-16 lowercase letters or digits, got {self.replica_id!r}")

    def replace(self, **changes) -> ServerSettings:
        """A copy with `changes` applied (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    @property
    def host_names(self) -> frozenset[str] | None:
        """The `Host` names the server answers, `None` for any (see `allowed_hosts`)."""
        if "*" in self.allowed_hosts:
            return None
        if self.allowed_hosts:
            return frozenset(self.allowed_hosts)
        return LOOPBACK_NAMES if is_loopback(self.host) else None


#: Names a loopback-bound server answers by default.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on loopback only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,45, got {text!r}") from error


def _str_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


@dataclass(frozen=True)
class _Option:
    flags: tuple[str, ...]
    dest: str
    type: Callable[[str], object]
    help: str
    engine: bool = False
    choices: Sequence[str] | None = None
    boolean: bool = False


_OPTIONS: tuple[_Option, ...] = (
    _Option(("--host",), "host", str, "interface to bind"),
    _Option(("--port",), "port", int, "TCP port (0 = any free port)"),
    _Option(("--model",), "model", str, "model spec: tiny, small, a hub id, a folder or a .safetensors file",
            engine=True),
    _Option(("--model-config",), "model_config", str,
            "for a single-file --model: a diffusers folder or hub id of the same architecture", engine=True),
    _Option(("--tiny-vae",), "use_tiny_vae", _bool, "decode with the tiny VAE (TAESD) instead of the model's VAE",
            engine=True, boolean=True),
    _Option(("--taesd",), "taesd", str, "hub id or folder of the TAESD to use with a real model", engine=True),
    _Option(("--width",), "width", int, "frame width in pixels (multiple of 8)", engine=True),
    _Option(("--height",), "height", int, "frame height in pixels (multiple of 8)", engine=True),
    _Option(("--t-index-list",), "t_index_list", _int_list, "denoising steps as indices, e.g. 32,45", engine=True),
    _Option(("--cfg-type", "--guidance"), "cfg_type", str, "guidance mode", engine=True, choices=CFG_TYPES),
    _Option(("--guidance-scale",), "guidance_scale", float, "classifier-free guidance scale", engine=True),
    _Option(("--backend",), "backend", str, "how the networks run", engine=True, choices=BACKENDS),
    _Option(("--vae-backend",), "vae_backend", str,
            "how the VAE runs when not on --backend, e.g. onnxruntime beside an eager UNet that batches sessions "
            "(None: on --backend)", engine=True, choices=BACKENDS),
    _Option(("--device",), "device", str, "torch device (auto picks CUDA when present)", engine=True),
    _Option(("--dtype",), "dtype", str, "auto, float32, float16 or bfloat16", engine=True),
    _Option(("--seed",), "seed", int, "seed of each session's fixed noise", engine=True),
    _Option(("--prompt",), "prompt", str, "prompt every session starts with", engine=True),
    _Option(("--negative-prompt",), "negative_prompt", str, "negative prompt every session starts with",
            engine=True),
    _Option(("--skip-policy",), "skip_policy", str, "per-frame skip policy (docs/skip_policies.md)", engine=True,
            choices=SKIP_POLICIES),
    _Option(("--memory",), "memory", str, "peak-memory mode for large frames (docs/memory.md)", engine=True,
            choices=MEMORY_MODES),
    _Option(("--similarity-filter",), "similarity_filter", _bool, "skip near-identical input frames",
            engine=True, boolean=True),
    _Option(("--max-sessions",), "max_sessions", int, "concurrent WebSocket sessions"),
    _Option(("--max-in-flight",), "max_in_flight", int, "frames in flight per session"),
    _Option(("--max-batch",), "max_batch", int, "most sessions' frames per batched network call (1 = one at a time)"),
    _Option(("--batch-wait-ms",), "batch_wait_ms", float,
            "how long a partial batch may wait for other sessions' frames still being decoded (0 = never)"),
    _Option(("--max-message-size",), "max_message_bytes", int, "largest binary WebSocket message (a frame) in bytes"),
    _Option(("--max-control-size",), "max_control_bytes", int,
            "largest control message in bytes: WebSocket text message or REST request body"),
    _Option(("--max-prompt-length",), "max_prompt_chars", int, "longest prompt in characters"),
    _Option(("--max-pixels",), "max_pixels", int, "largest input image in pixels"),
    _Option(("--token",), "token", str, "bearer token required on WebSocket and REST (prefer the env variable)"),
    _Option(("--cors-origins",), "cors_origins", _str_list,
            "comma-separated origins allowed by CORS and to open WebSockets from a browser (off if empty)"),
    _Option(("--allowed-hosts",), "allowed_hosts", _str_list,
            "comma-separated Host names answered (empty: loopback names when bound to loopback, else any; * any)"),
    _Option(("--insecure",), "insecure", _bool, "allow a non-loopback --host without a token", boolean=True),
    _Option(("--idle-timeout",), "idle_timeout_s", float,
            "seconds a WebSocket session may send nothing (with no frame in flight) before it is closed"),
    _Option(("--header-timeout",), "header_timeout_s", float,
            "seconds an HTTP connection may take to send its request headers"),
    _Option(("--max-connections",), "max_connections", int, "open TCP connections at most (HTTP and WebSocket)"),
    _Option(("--jpeg-quality",), "jpeg_quality", int, "quality of output JPEGs"),
    _Option(("--stats-interval",), "stats_interval_s", float, "seconds between stats events"),
    _Option(("--degraded-latency",), "degraded_latency_s", float, "latency in seconds that makes /health degraded"),
    _Option(("--warmup",), "warmup", _bool, "run one frame through the model before reporting ready",
            boolean=True),
    _Option(("--log-level",), "log_level", str, "logging level", choices=LOG_LEVELS),
    _Option(("--replica-id",), "replica_id", str,
            "prefix of this replica's session ids (`<id>-...`), for routing behind a proxy; empty for none"),
    _Option(("--threads",), "threads", int, "torch threads per model thread (0 = cores // 4, at least 1)"),
)


def env_name(flag: str) -> str:
    """The environment variable of a flag, e.g. `--max-sessions` → `STREAMDIFF_MAX_SESSIONS`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def build_parser() -> argparse.ArgumentParser:
    """The `python -m server` argument parser; every default shown comes from the dataclasses."""
    engine_defaults, server_defaults = EngineConfig(), ServerSettings()
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Real-time streaming image-to-image diffusion server. Every flag also reads "
                    f"{ENV_PREFIX}<NAME> from the environment (a flag wins over the variable).",
    )
    for option in _OPTIONS:
        default = getattr(engine_defaults if option.engine else server_defaults, option.dest)
        if isinstance(default, tuple):
            default = ",".join(str(item) for item in default) or "none"
        if option.dest == "token":
            default = "none"
        variable = env_name(option.flags[0])
        choices = f", one of {'|'.join(option.choices)}" if option.choices else ""
        help_text = f"{option.help}{choices} (default: {default}; env {variable})"
        if option.boolean:
            parser.add_argument(*option.flags, dest=option.dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(*option.flags, dest=option.dest, type=option.type, choices=option.choices,
                                default=None, metavar=variable.removeprefix(ENV_PREFIX), help=help_text)
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Settings from `argv` (default `sys.argv[1:]`) and `environ` (default `os.environ`).

    Invalid values exit through the parser with a message naming the flag or variable.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    engine_changes: dict[str, object] = {}
    server_changes: dict[str, object] = {}
    for option in _OPTIONS:
        value = getattr(args, option.dest)
        variable = env_name(option.flags[0])
        if value is None and variable in environ:
            raw = environ[variable]
            try:
                value = option.type(raw)
            except (argparse.ArgumentTypeError, ValueError) as error:
                parser.error(f"{variable}={raw!r}: {error}")
            if option.choices is not None and value not in option.choices:
                parser.error(f"{variable} must be one of {', '.join(option.choices)}, got {raw!r}")
        if value is not None:
            (engine_changes if option.engine else server_changes)[option.dest] = value
    try:
        return ServerSettings(engine=EngineConfig(**engine_changes), **server_changes)
    except ValueError as error:
        parser.error(str(error))
