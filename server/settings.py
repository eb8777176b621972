"""Server settings: command-line flags over `STREAMDIFF_*` environment variables over defaults.

Engine defaults live in `engine.config` only (`LoadConfig`, `StreamConfig`, `RuntimeOptions`) and the engine's
flags come from `engine.flags`, the vocabulary every command shares; a flag or variable that is not given
leaves the field at its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine.config import LoadConfig, RuntimeOptions, StreamConfig
from engine.flags import ENGINE_FLAGS, Flag, add_flags, boolean, configs_from, split_repeated, str_list

ENV_PREFIX = "STREAMDIFF_"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
#: A replica id is the session-id prefix a proxy routes on (`deploy/nginx.conf`), so it stays URL- and
#: nginx-name-safe.
REPLICA_ID_PATTERN = re.compile(r"[a-z0-9]{1,16}")


@dataclass(frozen=True)
class ServerSettings:
    """Everything that configures one server process.

    Args:
        load (`LoadConfig`): the model and how it runs (`--model`, `--backend`, ...), loaded once.
        stream (`StreamConfig`): the parameters every session starts with (`--width`, `--prompt`, ...).
        runtime (`RuntimeOptions`): JPEG quality, pixel limit and cross-session batching.
        host (`str`, defaults to `"127.0.0.1"`): interface to bind; loopback unless told otherwise.
        port (`int`, defaults to 8000): TCP port (0 picks a free one).
        max_sessions (`int`, defaults to 4): concurrent WebSocket sessions; more are closed with 1013.
        max_in_flight (`int`, defaults to 2): frames a session may have accepted but not yet answered.
        max_message_bytes (`int`, defaults to 8 MiB): largest binary WebSocket message (a frame); larger ones
            close with 1009.
        max_control_bytes (`int`, defaults to 16 KiB): largest control message: a WebSocket text message
            (larger ones close with 1009) or a REST request body (larger ones get 413 before they are read).
        max_prompt_chars (`int`, defaults to 1000): longest prompt or negative prompt, in characters.
        max_messages_per_s (`float`, defaults to 200): WebSocket messages (frames and control messages) a
            session may send a second, as many at once; past it frames are answered `dropped` and control
            messages `busy`, and a session at twice the rate for two seconds is closed (1008).
        token (`str | None`, defaults to None): when set, required on WebSocket and REST calls. An empty
            string is refused: unset the variable to run without a token.
        cors_origins (`tuple[str, ...]`, defaults to empty): origins allowed by CORS, and the only other
            origins (besides the server's own) whose browser pages may open a WebSocket; empty turns CORS off.
        allowed_hosts (`tuple[str, ...]`, defaults to empty): `Host` header values (names, without port) the
            server answers; `*` allows any. Empty means, against DNS rebinding: `localhost`, `127.0.0.1` and
            `::1` when bound to loopback; those, the bound address and the machine's names and addresses when
            bound elsewhere without a token (`--insecure`); any host when a token guards the server.
        insecure (`bool`, defaults to False): allow binding a non-loopback interface without a token.
        idle_timeout_s (`float`, defaults to 15): a WebSocket session that sends neither frame nor message for
            this long, with no frame in flight, is closed (4408) so it cannot hold a slot.
        header_timeout_s (`float`, defaults to 5): an HTTP connection whose request headers are not complete
            this long after its first byte (or its opening) is closed.
        max_connections (`int`, defaults to 256): open TCP connections (HTTP and WebSocket) at most; more are
            closed at once, so a flood cannot exhaust the process's file descriptors.
        stats_interval_s (`float`, defaults to 1.0): seconds between `stats` events of an active session.
        degraded_latency_s (`float`, defaults to 10.0): end-to-end latency above which `/health` says degraded.
        warmup (`bool`, defaults to True): run one frame through the model before reporting `ready`.
        log_level (`str`, defaults to `"info"`): logging level name.
        replica_id (`str`, defaults to `""`): when set, every session id starts with `<replica_id>-`, so a
            proxy in front of several replicas can send a session's REST calls to the replica that owns it.
        max_steps (`int`, defaults to 4): most denoising steps (`t_index_list` entries) a session may run; the
            default stream's must fit. Each step is a UNet call per frame: 4 is the most a real-time model
            (sd-turbo 1-2, LCM 4) needs.
        reprepare_interval_s (`float`, defaults to 1.0): seconds between two `t_index_list` changes of one
            session (each re-prepares and primes the stream on the shared inference thread); sooner is `busy`.
        shutdown_timeout_s (`float`, defaults to 10): on SIGTERM the server takes no new sessions (`/health` says
            `draining`), answers the frames in flight, closes every session with 1001 and exits, within this
            many seconds; a second SIGTERM exits at once.
        threads (`int`, defaults to 0): torch intra-op threads of each model thread (the runtime runs four
            at once: two input threads with the VAE encoder, UNet, VAE decode); 0 shares the cores among them
            (cores // 4, at least 1).
    """

    load: LoadConfig = field(default_factory=LoadConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    host: str = "127.0.0.1"
    port: int = 8000
    max_sessions: int = 4
    max_in_flight: int = 2
    max_message_bytes: int = 8 * 1024 * 1024
    max_control_bytes: int = 16 * 1024
    max_prompt_chars: int = 1000
    max_messages_per_s: float = 200.0
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    insecure: bool = False
    idle_timeout_s: float = 15.0
    header_timeout_s: float = 5.0
    max_connections: int = 256
    stats_interval_s: float = 1.0
    degraded_latency_s: float = 10.0
    warmup: bool = True
    log_level: str = "info"
    replica_id: str = ""
    max_steps: int = 4
    reprepare_interval_s: float = 1.0
    shutdown_timeout_s: float = 10.0
    threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        object.__setattr__(self, "allowed_hosts", tuple(host.lower() for host in self.allowed_hosts))
        if self.token is not None and not self.token.strip():
            raise ValueError("`token` is empty: set a real token, or unset it (STREAMDIFF_TOKEN) to run without one")
        if not self.insecure and self.token is None and not is_loopback(self.host):
            raise ValueError(f"refusing to listen on {self.host} without a token: anyone who can reach it could "
                             "stream. Set STREAMDIFF_TOKEN (or --token), or pass --insecure to allow it")
        for name in ("max_sessions", "max_in_flight", "max_message_bytes", "max_control_bytes", "max_prompt_chars",
                     "max_connections", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.stream.denoising_steps > self.max_steps:
            raise ValueError(f"the sessions' `t_index_list` has {self.stream.denoising_steps} steps, over `max_steps` "
                             f"= {self.max_steps} (--max-steps): raise it or name fewer steps")
        if self.reprepare_interval_s < 0:
            raise ValueError(f"`reprepare_interval_s` must be >= 0, got {self.reprepare_interval_s}")
        if not self.max_messages_per_s > 0:
            raise ValueError(f"`max_messages_per_s` must be positive, got {self.max_messages_per_s}")
        if self.threads < 0:
            raise ValueError(f"`threads` must be >= 0 (0 = share the cores), got {self.threads}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"`port` must lie in [0, 65535], got {self.port}")
        for name in ("stats_interval_s", "degraded_latency_s", "idle_timeout_s", "header_timeout_s",
                     "shutdown_timeout_s"):
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
        if is_loopback(self.host):
            return LOOPBACK_NAMES
        # Without a token nothing but the Host check stops a rebound page; with one, the token does.
        return machine_names(self.host) if self.token is None else None


def machine_names(bound: str) -> frozenset[str]:
    """The names a server bound to `bound` is reached by: the loopback names, the bound address (unless it is
    a wildcard), this machine's host names and the addresses they resolve to."""
    names = set(LOOPBACK_NAMES)
    if bound not in ("0.0.0.0", "::", ""):
        names.add(bound.strip("[]").lower())
    for name in {socket.gethostname(), socket.getfqdn()}:
        names.add(name.lower())
        try:
            names.update(str(info[4][0]).split("%")[0].lower() for info in socket.getaddrinfo(name, None))
        except OSError:  # a host name that does not resolve still names the machine
            pass
    return frozenset(names)


#: Names a loopback-bound server answers by default.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on loopback only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


#: The server's own flags; the engine's come from `engine.flags.ENGINE_FLAGS`.
SERVER_FLAGS: tuple[Flag, ...] = (
    Flag(("--host",), "host", "server", str, "interface to bind"),
    Flag(("--port",), "port", "server", int, "TCP port (0 = any free port)"),
    Flag(("--max-sessions",), "max_sessions", "server", int, "concurrent WebSocket sessions"),
    Flag(("--max-in-flight",), "max_in_flight", "server", int, "frames in flight per session"),
    Flag(("--max-message-size",), "max_message_bytes", "server", int,
         "largest binary WebSocket message (a frame) in bytes"),
    Flag(("--max-control-size",), "max_control_bytes", "server", int,
         "largest control message in bytes: WebSocket text message or REST request body"),
    Flag(("--max-prompt-length",), "max_prompt_chars", "server", int, "longest prompt in characters"),
    Flag(("--max-message-rate",), "max_messages_per_s", "server", float,
         "WebSocket messages a session may send a second; past it frames are dropped, and a flood is closed"),
    Flag(("--token",), "token", "server", str, "bearer token required on WebSocket and REST (prefer the env variable)"),
    Flag(("--cors-origins",), "cors_origins", "server", str_list,
         "comma-separated origins allowed by CORS and to open WebSockets from a browser (off if empty)"),
    Flag(("--allowed-hosts",), "allowed_hosts", "server", str_list,
         "comma-separated Host names answered (empty: loopback names on loopback, the machine's names and addresses "
         "without a token, any with a token; * any)"),
    Flag(("--insecure",), "insecure", "server", boolean, "allow a non-loopback --host without a token", boolean=True),
    Flag(("--idle-timeout",), "idle_timeout_s", "server", float,
         "seconds a WebSocket session may send nothing (with no frame in flight) before it is closed"),
    Flag(("--header-timeout",), "header_timeout_s", "server", float,
         "seconds an HTTP connection may take to send its request headers"),
    Flag(("--max-connections",), "max_connections", "server", int, "open TCP connections at most (HTTP and WebSocket)"),
    Flag(("--stats-interval",), "stats_interval_s", "server", float, "seconds between stats events"),
    Flag(("--degraded-latency",), "degraded_latency_s", "server", float,
         "latency in seconds that makes /health degraded"),
    Flag(("--warmup",), "warmup", "server", boolean, "run one frame through the model before reporting ready",
         boolean=True),
    Flag(("--log-level",), "log_level", "server", str, "logging level", LOG_LEVELS),
    Flag(("--replica-id",), "replica_id", "server", str,
         "prefix of this replica's session ids (`<id>-...`), for routing behind a proxy; empty for none"),
    Flag(("--max-steps",), "max_steps", "server", int,
         "most denoising steps (t_index_list entries) a session may run"),
    Flag(("--reprepare-interval",), "reprepare_interval_s", "server", float,
         "seconds between two t_index_list changes of one session"),
    Flag(("--shutdown-timeout",), "shutdown_timeout_s", "server", float,
         "seconds SIGTERM may take: drain (answer frames in flight, close sessions with 1001), then exit"),
    Flag(("--threads",), "threads", "server", int, "torch threads per model thread (0 = cores // 4, at least 1)"),
)
ALL_FLAGS: tuple[Flag, ...] = (*ENGINE_FLAGS, *SERVER_FLAGS)


def env_name(flag: str) -> str:
    """The environment variable of a flag, e.g. `--max-sessions` → `STREAMDIFF_MAX_SESSIONS`."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _default(flag: Flag, settings: ServerSettings) -> object:
    owner = {"load": settings.load, "runtime": settings.runtime, "server": settings}.get(flag.owner)
    if flag.owner == "stream":
        value = settings.stream.flat_params()[flag.dest]
    elif flag.dest == "batch_wait_s":
        value = settings.runtime.batch_wait_s * 1000
    else:
        value = getattr(owner, flag.dest)
    if isinstance(value, tuple):
        value = ",".join(str(item) for item in value) or "none"
    return "none" if value is None or flag.dest == "token" else value


def build_parser() -> argparse.ArgumentParser:
    """The `python -m server` argument parser; every default shown comes from the dataclasses."""
    defaults = ServerSettings()
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Real-time streaming image-to-image diffusion server. Every flag also reads "
                    f"{ENV_PREFIX}<NAME> from the environment (a flag wins over the variable).",
    )

    def describe(flag: Flag) -> str:
        choices = f", one of {'|'.join(flag.choices)}" if flag.choices else ""
        return f"{flag.help}{choices} (default: {_default(flag, defaults)}; env {env_name(flag.flags[0])})"

    add_flags(parser, ALL_FLAGS, describe)
    return parser


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerSettings:
    """Settings from `argv` (default `sys.argv[1:]`) and `environ` (default `os.environ`).

    Invalid values exit through the parser with a message naming the flag or variable.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for flag in ALL_FLAGS:
        value = getattr(args, flag.dest)
        variable = env_name(flag.flags[0])
        if value is None and variable in environ:
            raw = environ[variable]
            try:
                value = [flag.type(part) for part in split_repeated(raw)] if flag.repeatable else flag.type(raw)
            except (argparse.ArgumentTypeError, ValueError) as error:
                parser.error(f"{variable}={raw!r}: {error}")
            if flag.choices is not None and value not in flag.choices:
                parser.error(f"{variable} must be one of {', '.join(flag.choices)}, got {raw!r}")
        if value is not None:
            values[flag.dest] = value
    try:
        load, stream, runtime = configs_from(values)
        server = {flag.dest: values[flag.dest] for flag in SERVER_FLAGS if flag.dest in values}
        return ServerSettings(load=load, stream=stream, runtime=RuntimeOptions(**runtime), **server)
    except ValueError as error:
        parser.error(str(error))
