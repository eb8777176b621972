"""The part every compiled backend shares: one static-shape graph per call shape, opened once."""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import Protocol

import torch

from ..config import StreamConfig
from ..models import ModelBundle
from ..prompt import Conditioning
from .artifacts import GraphShape, OnnxCache, config_shapes
from .onnx_export import DEFAULT_EXPORTER, flat_key_values

logger = logging.getLogger(__name__)


class CompiledGraph(Protocol):
    """A loaded static-shape graph: inputs in the graph's order, one output."""

    def run(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The graph's output for `inputs` (a tensor the caller may keep)."""


class StaticShapeRunner:
    """`NetworkRunner` over static-shape graphs, looked up by the shapes of each call's tensors.

    One runner serves every stream of a model set and guidance mode at any size: a new shape opens
    its graph once (exporting or building it when the cache has none) and keeps it. Subclasses say
    how a graph is opened (`_open`).

    Args:
        models (`ModelBundle`): the models, on the device and dtype to run in.
        cfg_type (`str`): guidance mode (part of the UNet graphs' cache key).
        cache_dir (`Path`, *optional*): the cache folder (`trt_cache/` by default).
        exporter (`str`): ONNX exporter, `dynamo` (default) or `torchscript`.
    """

    backend = "static"

    def __init__(self, models: ModelBundle, cfg_type: str = "self", cache_dir: Path | None = None,
                 exporter: str = DEFAULT_EXPORTER):
        self.models = models
        self.onnx_cache = OnnxCache(models, cfg_type, cache_dir, exporter)
        self._graphs: dict[GraphShape, CompiledGraph] = {}
        self._lock = threading.Lock()
        # Contiguous K/V lists per live `Conditioning`, dropped when the conditioning is collected.
        self._key_values: dict[int, list[torch.Tensor]] = {}

    def _open(self, shape: GraphShape) -> CompiledGraph:
        raise NotImplementedError

    def artifact_path(self, shape: GraphShape) -> Path:
        """The cache file that `shape` runs from."""
        return self.onnx_cache.onnx_path(shape)

    def graph(self, shape: GraphShape) -> CompiledGraph:
        """The graph of `shape`, opened on first use."""
        graph = self._graphs.get(shape)
        if graph is None:
            with self._lock:
                graph = self._graphs.get(shape)
                if graph is None:
                    graph = self._open(shape)
                    logger.info("%s graph ready: %s batch %d at %dx%d", self.backend, shape.network, shape.batch,
                                shape.width, shape.height)
                    self._graphs[shape] = graph
        return graph

    def prepare(self, config: StreamConfig, kv_cache: bool, networks: tuple[str, ...] | None = None) -> list[Path]:
        """Open every graph a stream under `config` needs now, so no frame waits for one; returns their cache files.

        `networks` limits it to some of `unet`, `vae_encoder`, `vae_decoder` (a `SplitRunner` half).
        """
        paths = []
        for shape in config_shapes(self.models, config, kv_cache):
            if networks is not None and shape.network not in networks:
                continue
            self.graph(shape)
            paths.append(self.artifact_path(shape))
        return paths

    # ------------------------------------------------------------------ NetworkRunner

    def _flat_key_values(self, conditioning: Conditioning) -> list[torch.Tensor]:
        key = id(conditioning)
        cached = self._key_values.get(key)
        if cached is None:
            cached = [tensor.contiguous() for tensor in flat_key_values(self.models.unet, conditioning.kv_cache)]
            self._key_values[key] = cached
            weakref.finalize(conditioning, self._key_values.pop, key, None)
        return cached

    def _pixels(self, latents: torch.Tensor) -> tuple[int, int]:
        factor = self.models.vae_scale_factor
        return latents.shape[-2] * factor, latents.shape[-1] * factor

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        height, width = self._pixels(latents)
        if conditioning.kv_cache is not None:
            text_inputs = self._flat_key_values(conditioning)
            sequence_length = text_inputs[0].shape[2]
        else:
            text_inputs = [conditioning.encoder_hidden_states.contiguous()]
            sequence_length = text_inputs[0].shape[1]
        shape = GraphShape("unet", latents.shape[0], height, width, conditioning.kv_cache is not None,
                           sequence_length)
        return self.graph(shape).run([latents.contiguous(), timesteps.to(torch.long).contiguous(), *text_inputs])

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        shape = GraphShape("vae_encoder", images.shape[0], images.shape[-2], images.shape[-1])
        return self.graph(shape).run([images.contiguous()])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = self._pixels(latents)
        shape = GraphShape("vae_decoder", latents.shape[0], height, width)
        return self.graph(shape).run([latents.contiguous()])
