"""How the engine runs its three networks: the UNet, the VAE encoder and the VAE decoder."""

from .base import NetworkRunner, runner_name
from .eager import EagerRunner
from .errors import BackendUnavailableError
from .factory import BackendChoice, choose_backend, make_runner, resolve_backend, resolve_backend_choice

__all__ = ["BackendChoice", "BackendUnavailableError", "EagerRunner", "NetworkRunner", "choose_backend", "make_runner",
           "resolve_backend", "resolve_backend_choice", "runner_name"]
