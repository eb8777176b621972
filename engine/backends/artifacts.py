"""Which graphs an engine configuration needs (static, or dynamic over a resolution range), and their ONNX
files in the cache."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from .. import guidance
from ..config import StreamConfig
from ..controlnet import controlnet_body
from ..models import ModelBundle
from ..prompt import cross_attention_layers
from .cache import (
    CacheKeyParts,
    CorruptArtifactError,
    cached_artifact,
    default_cache_dir,
    engine_cache_key,
    module_fingerprint,
)
from .onnx_export import (
    DEFAULT_EXPORTER,
    DEFAULT_OPSETS,
    GRAPH_OUTPUT_NAMES,
    DynamicAxes,
    GraphSpec,
    added_cond_inputs,
    bank_layer_shapes,
    control_residual_names,
    controlnet_graph,
    export_onnx,
    graph_input_names,
    graph_output_names,
    residual_shapes,
    self_attention_layers,
    unet_graph,
    vae_decoder_graph,
    vae_encoder_graph,
)
from .resolution import ResolutionRange, size_multiple

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The VAE graphs do not depend on the guidance mode; one file serves every mode.
ANY_GUIDANCE = "any"


@dataclass(frozen=True)
class GraphShape:
    """One graph: the network, its batch and the image size in pixels.

    With a `resolution_range` it is the dynamic-shape graph serving every size of that range, and
    `height` and `width` are the range's opt size (the export's sample and TensorRT's opt). `control`: a UNet
    graph that takes the ControlNet residuals after its usual inputs (every UNet graph of an engine with a
    ControlNet). `bank_size`: a UNet graph with an attention bank of that many frames (`temporal="bank"` streams;
    `onnx_export`), 0 for none; such graphs are static only.
    """

    network: str
    batch: int
    height: int
    width: int
    kv_cache: bool = False
    sequence_length: int = 0
    resolution_range: ResolutionRange | None = None
    control: bool = False
    bank_size: int = 0

    def in_range(self, resolution_range: ResolutionRange) -> GraphShape:
        """The dynamic graph of `resolution_range` that serves this shape's network, batch and text."""
        return dataclasses.replace(self, height=resolution_range.opt_size, width=resolution_range.opt_size,
                                   resolution_range=resolution_range)


def config_shapes(models: ModelBundle, config: StreamConfig, kv_cache: bool) -> list[GraphShape]:
    """Every graph `StreamEngine` calls for a stream under `config`: the UNet batch(es) (taking the K/V cache as
    inputs when `kv_cache`), the VAE encoder and decoder; with a ControlNet, the UNet graphs take its residuals
    and the ControlNet has a graph of each UNet batch (prepared even at `controlnet_scale=0`: the scale is hot); a
    `temporal="bank"` stream's UNet graphs take its attention bank (`bank_size` frames)."""
    f, n = config.frame_buffer_size, config.denoising_steps
    if config.stream_batch:
        unet_batches = [guidance.unet_batch_size(config.cfg_type, n, f)]
    else:
        # Sequential runs call one slot at a time; `initialize` uses its extra slot on the first step only.
        unet_batches = [guidance.unet_batch_size(config.cfg_type, 1, f)]
        if config.cfg_type == "initialize":
            unet_batches.append(guidance.unet_batch_size("self", 1, f))
    sequence_length = models.tokenizer.model_max_length
    control = models.controlnet is not None
    bank_size = config.temporal_settings.bank_size if config.temporal == "bank" else 0
    shapes = [GraphShape("unet", batch, config.height, config.width, kv_cache, sequence_length, control=control,
                         bank_size=bank_size)
              for batch in unet_batches]
    if control:
        shapes += [GraphShape("controlnet", batch, config.height, config.width, False, sequence_length)
                   for batch in unet_batches]
    shapes.append(GraphShape("vae_encoder", f, config.height, config.width))
    shapes.append(GraphShape("vae_decoder", f, config.height, config.width))
    return shapes


def _dtype_name(module: torch.nn.Module) -> str:
    return str(next(module.parameters()).dtype).removeprefix("torch.")


def check_onnx_file(path: Path) -> Path:
    """Check the ONNX file at `path` by path, without reading external weights into memory.

    `onnx.checker.check_model(path)` parses the graph in C++ and checks that every external-data
    file exists (a `ModelProto` over 2 GiB cannot even be passed to it: loading and checking in
    Python refused every full-size fp32 UNet). The checker does not read the weights, so the
    external-data file's size is checked against the byte ranges the graph refers to.

    Raises:
        CorruptArtifactError: the file (or its weights) is missing, truncated or not an ONNX graph.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as error:
        raise CorruptArtifactError(f"{path.name} is not a valid ONNX graph: {error}") from error
    shortfalls = external_data_shortfalls(path)
    if shortfalls:
        raise CorruptArtifactError(f"{path.name}: external weights are truncated or missing ({'; '.join(shortfalls)})")
    return path


def onnx_input_shapes(path: Path) -> dict[str, tuple[int | str, ...]]:
    """Each input of the ONNX graph at `path` and its shape, read without its external weights.

    A dimension is its size, or its name when the graph leaves it dynamic (`dim_param`, "" if unnamed):
    what `tensorrt.profile_shapes` turns into an optimisation profile.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}
    return {
        value.name: tuple(dim.dim_value if dim.HasField("dim_value") else dim.dim_param
                          for dim in value.type.tensor_type.shape.dim)
        for value in model.graph.input if value.name not in initializers
    }


def external_data_shortfalls(path: Path) -> list[str]:
    """Each external-data file of the ONNX graph at `path` that is shorter than the graph's byte ranges need.

    Only graphs saved with their weights in the companion `<name>.data` are read (their `.onnx` is
    small); a graph with inline weights has nothing outside to check.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    if not path.with_name(path.name + ".data").is_file():
        return []
    model = onnx.load(str(path), load_external_data=False)
    needed: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            end = (info.offset or 0) + (info.length or 0)
            needed[info.location] = max(needed.get(info.location, 0), end)
    shortfalls = []
    for location, end in sorted(needed.items()):
        data = path.parent / location
        size = data.stat().st_size if data.is_file() else -1
        if size < end:
            shortfalls.append(f"{location}: {max(size, 0)} bytes, the graph reads up to {end}")
    return shortfalls


class OnnxCache:
    """The ONNX graphs of one model set and guidance mode, exported on first use and kept on disk.

    Args:
        models (`ModelBundle`): the models to export (on the device and dtype they will run in).
        cfg_type (`str`): the guidance mode of the UNet graphs (part of their key).
        cache_dir (`Path`, *optional*): where files go; `trt_cache/` (or `$STREAMDIFF_TRT_CACHE`) by default.
        exporter (`str`): `dynamo` or `torchscript` (see `onnx_export`).
        opset (`int`, *optional*): ONNX opset; the exporter's default when omitted.
    """

    def __init__(self, models: ModelBundle, cfg_type: str, cache_dir: Path | None = None,
                 exporter: str = DEFAULT_EXPORTER, opset: int | None = None):
        self.models = models
        self.cfg_type = cfg_type
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.exporter = exporter
        self.opset = opset or DEFAULT_OPSETS[exporter]
        self._fingerprints: dict[str, str] = {}

    def _module(self, network: str) -> torch.nn.Module:
        if network == "controlnet":
            if self.models.controlnet is None:
                raise ValueError("these models have no ControlNet: there is no controlnet graph")
            # The graph is the ControlNet's body (its condition embedding runs outside): keyed by the body's weights.
            return controlnet_body(self.models.controlnet)
        return self.models.unet if network == "unet" else self.models.vae

    def _fingerprint(self, network: str) -> str:
        # Hashing the weights is the slow part of a key (seconds for a full-size UNet): once per network.
        if network not in self._fingerprints:
            self._fingerprints[network] = module_fingerprint(self._module(network))
        return self._fingerprints[network]

    def key_parts(self, shape: GraphShape, tensorrt_version: str = "none", gpu_name: str = "any") -> CacheKeyParts:
        """The cache key fields of `shape`; an ONNX graph is the same for every GPU and TensorRT version.

        The dtype is the modules' own: a graph exported from float16 modules is a float16 graph, and a
        TensorRT engine built from it (strongly typed) runs in exactly that precision. The ControlNet's graph is
        keyed by the ControlNet's own config and weights (`model_hash`), so two ControlNets never share one; a
        UNet graph with residual inputs (`shape.control`) by the UNet's, marked `control_residuals`; one with an
        attention bank by its capacity (`attention_bank`).
        """
        module = self._module(shape.network)
        return CacheKeyParts(
            network=shape.network,
            model_hash=self._fingerprint(shape.network),
            width=shape.width,
            height=shape.height,
            batch=shape.batch,
            cfg_type=self.cfg_type if shape.network in ("unet", "controlnet") else ANY_GUIDANCE,
            dtype=_dtype_name(module),
            kv_cache=shape.kv_cache,
            exporter=self.exporter,
            opset=self.opset,
            tensorrt_version=tensorrt_version,
            gpu_name=gpu_name,
            sequence_length=shape.sequence_length,
            resolution_range=shape.resolution_range.key() if shape.resolution_range is not None else None,
            # A LoRA changes the UNet (and text encoders), never the VAE.
            loras=tuple(map(str, self.models.loras)) if shape.network == "unet" else (),
            control_residuals=shape.network == "unet" and shape.control,
            attention_bank=shape.bank_size if shape.network == "unet" else 0,
        )

    def onnx_path(self, shape: GraphShape) -> Path:
        """Where the graph of `shape` lives in the cache."""
        return self.cache_dir / f"{engine_cache_key(self.key_parts(shape))}.onnx"

    def _bank_layers(self, shape: GraphShape) -> list[str]:
        return list(self_attention_layers(self.models.unet)) if shape.network == "unet" and shape.bank_size else []

    def input_names(self, shape: GraphShape) -> list[str]:
        """The graph's input names in the order `StaticShapeRunner` passes the tensors."""
        residuals = control_residual_names(self.models.unet) if shape.network == "unet" and shape.control else []
        return graph_input_names(shape.network, list(cross_attention_layers(self.models.unet)), shape.kv_cache,
                                 added_cond_inputs(self.models.unet), residuals, self._bank_layers(shape))

    @staticmethod
    def output_name(shape: GraphShape) -> str:
        """The output name of a single-output graph (the UNet's, the VAE halves')."""
        return GRAPH_OUTPUT_NAMES[shape.network]

    def output_names(self, shape: GraphShape) -> list[str]:
        """The graph's output names, in order (the ControlNet's residuals, else its one output, for a UNet graph with
        an attention bank followed by each self-attention layer's tensors of the call)."""
        residuals = len(control_residual_names(self.models.unet)) if shape.network == "controlnet" else 0
        return graph_output_names(shape.network, residuals, self._bank_layers(shape))

    def graph_spec(self, shape: GraphShape) -> GraphSpec:
        """The module and sample inputs that export `shape` (with dynamic height and width for a range)."""
        factor = self.models.vae_scale_factor
        latent_height, latent_width = shape.height // factor, shape.width // factor
        if shape.network == "unet":
            spec = unet_graph(self.models, shape.batch, latent_height, latent_width, shape.kv_cache,
                              shape.sequence_length or None, shape.control, shape.bank_size)
        elif shape.network == "controlnet":
            spec = controlnet_graph(self.models, shape.batch, latent_height, latent_width,
                                    shape.sequence_length or None)
        elif shape.network == "vae_encoder":
            spec = vae_encoder_graph(self.models, shape.batch, shape.height, shape.width)
        elif shape.network == "vae_decoder":
            spec = vae_decoder_graph(self.models, shape.batch, latent_height, latent_width)
        else:
            raise ValueError(f"unknown network {shape.network!r}")
        if shape.resolution_range is not None:
            # The encoder's first input is pixels, the UNet's and the decoder's latents.
            scale = 1 if shape.network == "vae_encoder" else factor
            spec.dynamic = DynamicAxes(size_multiple(self.models) // scale, shape.resolution_range.min_size // scale,
                                       shape.resolution_range.max_size // scale)
        return spec

    def output_shapes(self, shape: GraphShape) -> list[tuple[int, ...]]:
        """The output shapes of a call of `shape`'s size, in `output_names` order."""
        factor = self.models.vae_scale_factor
        if shape.network == "controlnet":
            return residual_shapes(self.models.unet, shape.batch, shape.height // factor, shape.width // factor)
        if shape.network == "unet" and shape.bank_size:
            layers = bank_layer_shapes(self.models.unet, shape.batch, shape.height // factor, shape.width // factor)
            return [self.output_shape(shape), *(each for shapes in layers.values() for each in shapes)]
        return [self.output_shape(shape)]

    def output_shape(self, shape: GraphShape) -> tuple[int, ...]:
        """The output shape of a call of `shape`'s size (a dynamic graph's output follows its input); single-output
        graphs only (see `output_shapes`)."""
        factor = self.models.vae_scale_factor
        latent = (shape.height // factor, shape.width // factor)
        if shape.network == "unet":
            return (shape.batch, int(self.models.unet.config.out_channels), *latent)
        if shape.network == "vae_encoder":
            return (shape.batch, int(self.models.vae.config.latent_channels), *latent)
        if shape.network == "vae_decoder":
            return (shape.batch, int(self.models.vae.config.out_channels), shape.height, shape.width)
        raise ValueError(f"unknown network {shape.network!r}")

    def load(self, shape: GraphShape, load: Callable[[Path], T] | None = None) -> T | Path:
        """`load(path)` of the graph's checked ONNX file (its path without `load`), exported first when
        missing or corrupt. Errors of `load` itself propagate and keep the file (see `cached_artifact`)."""

        def checked(path: Path):
            check_onnx_file(path)
            return path if load is None else load(path)

        return cached_artifact(
            self.onnx_path(shape),
            build=lambda temporary: export_onnx(self.graph_spec(shape), temporary, self.exporter, self.opset),
            load=checked,
            key_parts=self.key_parts(shape),
        )
