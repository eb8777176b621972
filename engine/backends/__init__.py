"""How the engine runs its three networks: the UNet, the VAE encoder and the VAE decoder."""

from .base import NetworkRunner, runner_name
from .eager import EagerRunner
from .errors import BackendUnavailableError
from .factory import make_runner, resolve_backend

__all__ = ["BackendUnavailableError", "EagerRunner", "NetworkRunner", "make_runner", "resolve_backend", "runner_name"]
