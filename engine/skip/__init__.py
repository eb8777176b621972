"""Optional per-frame skip policies of the stream batch (DESIGN.md §3): `rehash` and `adacache`.

`make_skip_policy` builds a stream's policy from its `StreamConfig` (None when `skip_policy="off"`, so
the engine runs exactly as without one); `update_skip_policy` follows hot config changes.
"""

from __future__ import annotations

from ..backends.eager import EagerRunner
from ..backends.split import unet_runner_of
from ..config import StreamConfig
from ..models import ModelBundle
from .base import SkipPolicy, SkipStats, SlotFrame

__all__ = ["SkipPolicy", "SkipStats", "SlotFrame", "check_skip_policy", "make_skip_policy", "update_skip_policy"]


def check_skip_policy(config: StreamConfig, runner: object) -> None:
    """`ValueError` when `config`'s policy cannot run on `runner`.

    Policies run the UNet's own modules piecewise, so they need an eager UNet runner (the VAE may run on
    another `vae_backend`): a compiled (ONNX Runtime/TensorRT) UNet graph is one static whole-UNet call
    with nothing to skip inside.
    """
    unet_runner = unet_runner_of(runner)
    if config.skip_policy != "off" and not isinstance(unet_runner, EagerRunner):
        raise ValueError(f"`skip_policy={config.skip_policy!r}` needs the eager backend; the stream's UNet runner "
                         f"is {type(unet_runner).__name__} (set `skip_policy='off'` or `backend='eager'`)")


def make_skip_policy(models: ModelBundle, config: StreamConfig, runner: object) -> SkipPolicy | None:
    """The policy `config.skip_policy` names, for one stream; `ValueError` with a compiled runner
    (`check_skip_policy`)."""
    check_skip_policy(config, runner)
    if config.skip_policy == "off":
        return None
    if config.skip_policy == "rehash":
        from .rehash import RehashPolicy

        return RehashPolicy(models.unet, config.skip)
    from .adacache import AdaCachePolicy

    return AdaCachePolicy(models.unet, config.skip)


def update_skip_policy(policy: SkipPolicy | None, models: ModelBundle, old: StreamConfig, new: StreamConfig,
                       runner: object, clear: bool) -> SkipPolicy | None:
    """The policy after a config change: a new one if the kind changed, else the same one with the new
    thresholds, its caches cleared when `clear` (prompt, size, seed or step changes)."""
    if new.skip_policy != old.skip_policy or policy is None:
        return make_skip_policy(models, new, runner)
    policy.update_settings(new.skip)
    if clear:
        policy.reset()
    return policy
