"""Per-row residual caching of the UNet's deep blocks, through wrappers on diffusers' own modules.

The cacheable units are the ResNet blocks, self-attention, cross-attention and feed-forward modules
between the first down block and the last up block. Within a `residual_pass`, a unit computes only the
rows marked fresh (gathered into a smaller batch) and serves every other row its fresh input plus the
residual cached at that row's last compute: for a ResNet block `shortcut(x)/s + r`, for an attention
or feed-forward branch (whose output the transformer block adds to its input) `r` itself.

The wrappers are installed on the shared UNet only while a pass runs (`wrapped_units`, reference
counted) and pass every call straight through on threads without an active pass, so other streams,
exports and compiled backends never see them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from .base import SkipStats

MAIN, CROSS = "main", "cross"


@dataclass(frozen=True)
class Unit:
    """One cacheable module: its name in the UNet, its freshness group and whether it is a ResNet block."""

    name: str
    module: torch.nn.Module
    group: str
    is_resnet: bool

    def shortcut(self, inputs: torch.Tensor) -> torch.Tensor:
        """The ResNet block's skip path, already divided by its output scale."""
        resnet = self.module
        skip = resnet.conv_shortcut(inputs) if resnet.conv_shortcut is not None else inputs
        return skip / resnet.output_scale_factor

    def residual(self, output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return output - self.shortcut(inputs) if self.is_resnet else output

    def reuse(self, residual: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        return self.shortcut(inputs) + residual if self.is_resnet else residual


def deep_units(unet: torch.nn.Module) -> list[Unit]:
    """The cacheable units between the head (first down block) and the tail (last up block)."""
    regions = [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks) if i > 0]
    regions.append(("mid_block", unet.mid_block))
    regions += [(f"up_blocks.{i}", block) for i, block in enumerate(unet.up_blocks) if i < len(unet.up_blocks) - 1]
    units = []
    for prefix, region in regions:
        for name, module in region.named_modules(prefix=prefix):
            if isinstance(module, ResnetBlock2D) and module.upsample is None and module.downsample is None:
                units.append(Unit(name, module, MAIN, True))
            elif isinstance(module, Attention):
                units.append(Unit(name, module, CROSS if module.is_cross_attention else MAIN, False))
            elif isinstance(module, FeedForward):
                units.append(Unit(name, module, MAIN, False))
    return units


@dataclass
class ResidualPass:
    """One stream's state for one UNet call: which rows are fresh per group, and its residual caches.

    Args:
        fresh (`dict[str, torch.Tensor]`): per group (`main`, `cross`), a bool mask over the UNet rows.
        caches (`dict[str, torch.Tensor]`): per unit name, the residual of every row (updated in place).
        stats (`SkipStats`): counts rows requested and computed per unit.
    """

    fresh: dict[str, torch.Tensor]
    caches: dict[str, torch.Tensor]
    stats: SkipStats
    mid_residual: torch.Tensor | None = None
    _index: dict[str, torch.Tensor] = field(default_factory=dict)

    def run(self, unit: Unit, original, args: tuple, kwargs: dict) -> torch.Tensor:
        fresh = self.fresh[unit.group]
        rows = fresh.shape[0]
        inputs = args[0] if args else kwargs.get("input_tensor", kwargs.get("hidden_states"))
        cached = self.caches.get(unit.name)
        computed = int(fresh.sum())
        if cached is None or computed == rows:
            output = original(*args, **kwargs)
            self.caches[unit.name] = unit.residual(output, inputs)
            self.stats.count(rows, rows)
            return output
        self.stats.count(rows, computed)
        reused = unit.reuse(cached, inputs)
        if computed == 0:
            return reused
        index = self._index.setdefault(unit.group, fresh.nonzero().squeeze(1))
        processor_name = getattr(getattr(unit.module, "processor", None), "name", None)
        output = original(*_gather(args, index, rows, processor_name), **_gather(kwargs, index, rows, processor_name))
        self.caches[unit.name] = cached.index_copy(0, index, unit.residual(output, inputs[index]))
        return reused.index_copy(0, index, output)


def _gather(value, index: torch.Tensor, rows: int, processor_name: str | None):
    """`value` with every tensor of `rows` rows cut to `index`; of a K/V cache only this layer's entry."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, dict):
        if "kv_cache" in value and value["kv_cache"] is not None and processor_name is not None:
            layer = value["kv_cache"].get(processor_name)
            value = {**value, "kv_cache": {} if layer is None else {processor_name: layer}}
        return {key: _gather(item, index, rows, processor_name) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(item, index, rows, processor_name) for item in value)
    return value


_active = threading.local()
_install_lock = threading.Lock()
_installs: dict[int, int] = {}
_probes: dict[int, torch.utils.hooks.RemovableHandle] = {}


def _wrap(unit: Unit):
    original = type(unit.module).forward.__get__(unit.module)

    def forward(*args, **kwargs):
        context = getattr(_active, "context", None)
        if context is None:
            return original(*args, **kwargs)
        return context.run(unit, original, args, kwargs)

    return forward


def _record_mid_residual(module, args, output) -> None:
    context = getattr(_active, "context", None)
    if context is not None:
        context.mid_residual = output - args[0]


@contextmanager
def wrapped_units(unet: torch.nn.Module, units: list[Unit], context: ResidualPass) -> Iterator[None]:
    """Run the block under `context` on this thread: wrappers on `units` and a mid-block residual probe."""
    key = id(unet)
    with _install_lock:
        if _installs.get(key, 0) == 0:
            for unit in units:
                unit.module.forward = _wrap(unit)
            _probes[key] = unet.mid_block.register_forward_hook(_record_mid_residual)
        _installs[key] = _installs.get(key, 0) + 1
    _active.context = context
    try:
        yield
    finally:
        _active.context = None
        with _install_lock:
            _installs[key] -= 1
            if _installs[key] == 0:
                del _installs[key]
                for unit in units:
                    del unit.module.forward
                _probes.pop(key).remove()
