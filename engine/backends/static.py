"""The part every compiled backend shares: one graph per call shape (or one dynamic-resolution graph for
every size in a range), opened once.

With a ControlNet (`ModelBundle.controlnet`), `controlnet` runs the ControlNet's graph and every UNet call runs the
UNet graph that takes the residuals as inputs (`onnx_export`). A call without residuals (`conditioning.control` is
None: the stream's `controlnet_scale` is 0, so the ControlNet was not run) feeds that same graph zeros of the
residuals' shapes: adding 0 changes no value, so it is exactly the UNet without a ControlNet, with one UNet graph
per shape rather than two.

Attention bank (`temporal="bank"`): a call whose conditioning carries the stream's `AttentionBank` runs the UNet
graph with a bank of the bank's capacity (`onnx_export`): the banked frames go in padded to capacity with a mask of
the empty slots, the injection threshold and strength as inputs, and the graph's per-layer keys, values and
attention outputs of the call go back to the bank (`AttentionBank.record`), which banks them on `commit` as the
eager UNet's would be. Bank graphs are static: inside a resolution range a bank stream gets a static graph of its
size.
"""

from __future__ import annotations

import logging
import threading
import weakref
from pathlib import Path
from typing import Protocol

import torch

from ..config import StreamConfig
from ..control.residuals import ControlResiduals
from ..controlnet import control_embedding_channels, embed_control
from ..models import ModelBundle
from ..prompt import Conditioning
from ..temporal import AttentionBank
from .artifacts import GraphShape, OnnxCache, config_shapes
from .base import RunnerCapabilities
from .onnx_export import (
    ADDED_COND_INPUTS,
    BANK_LAYER_OUTPUTS,
    DEFAULT_EXPORTER,
    bank_layer_shapes,
    flat_key_values,
    residual_shapes,
)
from .resolution import ResolutionRange, check_range, size_multiple

logger = logging.getLogger(__name__)


class CompiledGraph(Protocol):
    """A loaded graph: inputs in the graph's order, one output."""

    def run(self, inputs: list[torch.Tensor], output_shape: tuple[int, ...]) -> torch.Tensor:
        """The graph's output for `inputs`, of `output_shape` (a tensor the caller may keep)."""

    def run_outputs(self, inputs: list[torch.Tensor], output_shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Every output of the graph for `inputs`, in its output order, of `output_shapes`."""


class StaticShapeRunner:
    """`NetworkRunner` over compiled graphs, looked up by the shapes of each call's tensors.

    One runner serves every stream of a model set and guidance mode at any size: a new shape opens
    its graph once (exporting or building it when the cache has none) and keeps it. With a
    `resolution_range`, every size inside the range runs on one dynamic-shape graph per network and
    batch, so a stream changing size inside it opens nothing new; a size outside it gets a static graph
    of its own. Subclasses say how a graph is opened (`_open`).

    Args:
        models (`ModelBundle`): the models, on the device and dtype to run in.
        cfg_type (`str`): guidance mode (part of the UNet graphs' cache key).
        cache_dir (`Path`, *optional*): the cache folder (`trt_cache/` by default).
        exporter (`str`): ONNX exporter, `dynamo` (default) or `torchscript`.
        resolution_range (`ResolutionRange`, *optional*): serve the sizes of this range from dynamic-shape
            graphs; None (default) gives static graphs, the faster choice for a server that keeps one size.

    Raises:
        ValueError: a range whose sizes are not multiples of the model's `size_multiple`, or a range with a
            ControlNet (its graphs are static only).
    """

    #: Static graphs take one batch size each (no cross-session batching); `temporal="bank"` streams run with
    #: their bank as graph inputs and outputs; the ControlNet has graphs of its own.
    capabilities = RunnerCapabilities("static", attention_bank=True, controlnet=True, graphs_per_shape=True)

    def __init__(self, models: ModelBundle, cfg_type: str = "self", cache_dir: Path | None = None,
                 exporter: str = DEFAULT_EXPORTER, resolution_range: ResolutionRange | None = None):
        self.models = models
        self.onnx_cache = OnnxCache(models, cfg_type, cache_dir, exporter)
        self.size_multiple = size_multiple(models)
        self.resolution_range = check_range(resolution_range, self.size_multiple) if resolution_range else None
        if self.resolution_range is not None and models.controlnet is not None:
            raise ValueError(f"a resolution range ({self.resolution_range}) does not take a ControlNet on the "
                             f"{self.capabilities.name} backend: its graphs (the ControlNet's, and the UNet's with "
                             "residual inputs) are static; drop the range (one static graph per size), or use "
                             "backend='eager'")
        self._graphs: dict[GraphShape, CompiledGraph] = {}
        self._lock = threading.Lock()
        # Contiguous K/V lists per live `Conditioning`, dropped when the conditioning is collected.
        self._key_values: dict[int, list[torch.Tensor]] = {}
        # The zero residuals of each UNet call shape without ControlNet residuals (read only: bound, never written).
        self._zero_residuals: dict[tuple[int, ...], list[torch.Tensor]] = {}
        # One frame's bank tensor shapes per self-attention layer, per UNet call shape (`bank_layer_shapes`).
        self._bank_shapes: dict[tuple[int, ...], dict[str, tuple[tuple[int, ...], ...]]] = {}

    def graph_shape(self, shape: GraphShape) -> GraphShape:
        """The graph a call of `shape` runs on: the range's dynamic graph when the range covers its size,
        else the static graph of `shape` itself (always for a graph with an attention bank)."""
        if self.resolution_range is not None and not shape.bank_size \
                and self.resolution_range.covers(shape.height, shape.width, self.size_multiple):
            return shape.in_range(self.resolution_range)
        return shape

    def _open(self, shape: GraphShape) -> CompiledGraph:
        raise NotImplementedError

    def artifact_path(self, shape: GraphShape) -> Path:
        """The cache file of graph `shape` (a `graph_shape`)."""
        return self.onnx_cache.onnx_path(shape)

    def graph(self, shape: GraphShape) -> CompiledGraph:
        """The graph a call of `shape` runs on (see `graph_shape`), opened on first use."""
        shape = self.graph_shape(shape)
        graph = self._graphs.get(shape)
        if graph is None:
            with self._lock:
                graph = self._graphs.get(shape)
                if graph is None:
                    graph = self._open(shape)
                    if shape.resolution_range is not None:
                        size = f"any size in {shape.resolution_range.min_size}-{shape.resolution_range.max_size}"
                    else:
                        size = f"{shape.width}x{shape.height}"
                        if self.resolution_range is not None:
                            size += f" (a static graph: outside resolution range {self.resolution_range})"
                    logger.info("%s graph ready: %s batch %d at %s", self.capabilities.name, shape.network,
                                shape.batch, size)
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
            paths.append(self.artifact_path(self.graph_shape(shape)))
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
        control = self.models.controlnet is not None
        inputs = [latents.contiguous(), timesteps.to(torch.long).contiguous(), *self._added(conditioning),
                  *text_inputs, *self._residuals(latents, conditioning)]
        bank = conditioning.temporal_bank
        if bank is None:
            shape = GraphShape("unet", latents.shape[0], height, width, conditioning.kv_cache is not None,
                               sequence_length, control=control)
            return self._run(shape, inputs)
        count = bank.frame_count(latents.shape[0])  # first: a bank of another layout starts over here
        shape = GraphShape("unet", latents.shape[0], height, width, conditioning.kv_cache is not None,
                           sequence_length, control=control, bank_size=bank.capacity)
        layers = self._bank_layer_shapes(latents)
        inputs += self._bank_inputs(bank, layers, count, shape.bank_size, latents)
        output_shapes = [self.onnx_cache.output_shape(shape), *(each for shapes in layers.values() for each in shapes)]
        outputs = self.graph(shape).run_outputs(inputs, output_shapes)
        per_layer = len(BANK_LAYER_OUTPUTS)
        for index, name in enumerate(layers):
            bank.record(name, *outputs[1 + per_layer * index:1 + per_layer * (index + 1)])
        return outputs[0]

    def _bank_layer_shapes(self, latents: torch.Tensor) -> dict[str, tuple[tuple[int, ...], ...]]:
        key = tuple(latents.shape)
        shapes = self._bank_shapes.get(key)
        if shapes is None:
            shapes = bank_layer_shapes(self.models.unet, key[0], key[2], key[3])
            self._bank_shapes[key] = shapes
        return shapes

    @staticmethod
    def _bank_inputs(bank: AttentionBank, layers: dict[str, tuple[tuple[int, ...], ...]], count: int,
                     capacity: int, latents: torch.Tensor) -> list[torch.Tensor]:
        """The bank graph's inputs (`bank_input_names` order): the mask of `count` banked frames of `capacity`, the
        injection threshold and strength, each layer's banked tensors padded to capacity."""
        options = {"device": latents.device, "dtype": latents.dtype}
        mask = torch.zeros(capacity, **options)
        mask[count:] = float("-inf")
        settings = bank.settings
        inputs = [mask, torch.tensor([settings.injection_threshold], **options),
                  torch.tensor([settings.injection_strength], **options)]
        for name, shapes in layers.items():
            inputs.extend(bank.padded(name, shapes, capacity, latents))
        return inputs

    @torch.no_grad()
    def control_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The ControlNet's condition embedding, in PyTorch on the models' device: once per frame on the input
        stage, a few convolutions (`engine.controlnet.embed_control`)."""
        if self.models.controlnet is None:
            raise ValueError("these models have no ControlNet")
        return embed_control(self.models.controlnet, images)

    def controlnet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                   embeddings: torch.Tensor) -> ControlResiduals:
        """The ControlNet's residuals at scale 1 (its own graph: the text embeddings and the embedded control
        images in, no K/V cache)."""
        if self.models.controlnet is None:
            raise ValueError("these models have no ControlNet")
        height, width = self._pixels(latents)
        expected = (latents.shape[0], control_embedding_channels(self.models.controlnet), *latents.shape[-2:])
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"control embeddings {tuple(embeddings.shape)} do not fit latents "
                             f"{tuple(latents.shape)}: expected {expected}")
        states = conditioning.encoder_hidden_states.contiguous()
        shape = GraphShape("controlnet", latents.shape[0], height, width, False, states.shape[1])
        inputs = [latents.contiguous(), timesteps.to(torch.long).contiguous(), *self._added(conditioning), states,
                  embeddings.to(latents.dtype).contiguous()]
        outputs = self.graph(shape).run_outputs(inputs, self.onnx_cache.output_shapes(shape))
        return ControlResiduals.from_tensors(outputs)

    @staticmethod
    def _added(conditioning: Conditioning) -> list[torch.Tensor]:
        return [] if conditioning.added_cond is None else \
            [conditioning.added_cond[name].contiguous() for name in ADDED_COND_INPUTS]

    def _residuals(self, latents: torch.Tensor, conditioning: Conditioning) -> list[torch.Tensor]:
        """The UNet graph's residual inputs: the conditioning's, or zeros when it has none (exactly no ControlNet);
        none for models without a ControlNet."""
        if self.models.controlnet is None:
            if conditioning.control is not None:
                raise ValueError("ControlNet residuals were given, but these models have no ControlNet (their UNet "
                                 "graphs take no residuals)")
            return []
        if conditioning.control is not None:
            return [tensor.to(latents.dtype).contiguous() for tensor in conditioning.control.tensors()]
        key = tuple(latents.shape)
        zeros = self._zero_residuals.get(key)
        if zeros is None:
            zeros = [torch.zeros(shape, device=latents.device, dtype=latents.dtype)
                     for shape in residual_shapes(self.models.unet, *key[:1], *key[2:])]
            self._zero_residuals[key] = zeros
        return zeros

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        shape = GraphShape("vae_encoder", images.shape[0], images.shape[-2], images.shape[-1])
        return self._run(shape, [images.contiguous()])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        height, width = self._pixels(latents)
        shape = GraphShape("vae_decoder", latents.shape[0], height, width)
        return self._run(shape, [latents.contiguous()])

    def _run(self, shape: GraphShape, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.graph(shape).run(inputs, self.onnx_cache.output_shape(shape))
