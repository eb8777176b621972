"""How the engine runs its three networks: the UNet, the VAE encoder and the VAE decoder."""

from .base import NetworkRunner
from .eager import EagerRunner

__all__ = ["NetworkRunner", "EagerRunner"]
