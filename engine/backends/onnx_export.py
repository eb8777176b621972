"""Export the UNet, the VAE encoder and the VAE decoder to ONNX graphs with static shapes, or with a
dynamic height and width (`DynamicAxes`) for a resolution range.

The UNet graph takes the prompt's cached cross-attention K/V as inputs (one key and one value per
cross-attention layer), so a compiled UNet never re-projects the text and stays exactly equal to
the eager UNet served by `CachedKVAttnProcessor`. Without the K/V cache the graph takes the text
embeddings instead. An SDXL UNet also takes its added conditioning, `text_embeds` and `time_ids`.

ControlNet: the ControlNet is a graph of its own (`controlnet`: latents, timesteps, SDXL's added inputs, the text
embeddings, which its own cross-attention projects, and `control_embedding`, the condition embedding of the
control images, computed once per frame outside the graph (`engine.controlnet.embed_control`); out come its
residuals at scale 1, `down_residual_0..N-1` then `mid_residual`, the order of `ControlResiduals.tensors`). The
UNet graph of an engine with a ControlNet takes those residuals as extra inputs after its usual ones
(`control_residual_names`). Two graphs rather than one fused: a stream at `controlnet_scale=0` skips the
ControlNet, and a stream may reuse its residuals across frames (`controlnet_reuse_interval`), neither of which a
fused graph could do; the UNet graph with residual inputs serves every ControlNet of its UNet, and the ControlNet
graph is keyed by the ControlNet's own weights.

Attention bank (`temporal="bank"`): a UNet graph for a bank of fixed capacity (`bank_size` frames) takes, after
its usual inputs (and residuals), `bank_mask` (capacity,: 0 for a banked frame, −inf for an empty slot),
`injection_threshold` and `injection_strength` (shape (1,), inputs so they stay hot) and, per self-attention
layer in module order, `<layer>.bank_key`, `<layer>.bank_value` (rows, heads, capacity·tokens, dim) and
`<layer>.bank_output` (rows, capacity·tokens, channels); its outputs are `eps`, then per layer this call's
`<layer>.new_key`, `<layer>.new_value` and `<layer>.new_output` (what the stream's `AttentionBank` keeps). Inside,
`engine.temporal.PaddedBank` plays the eager bank's part, its empty slots masked with −inf. Static shapes only.

Exporter: `torch.onnx.export(..., dynamo=True)` (the `torch.export`-based exporter, opset 18) is the
default. With torch 2.13 both it and the legacy TorchScript exporter (`dynamo=False`) export these
graphs and match eager within 2e-6 here; the dynamo one is torch's supported path (the TorchScript one
is deprecated since torch 2.9 and warns on every diffusers shape assert), while the TorchScript one
exports about five times faster. Both are selectable; the exporter and opset are part of the cache key.

Dynamic height and width: the dynamo exporter takes `torch.export` dims stated as multiples
(`multiple * Dim("height_blocks", min, max)`): a plain `Dim` fails, because the diffusers UNet checks
`size % 2**num_upsamplers` and its down/up-sampled sizes must match, guards that hold only for
multiples. The TorchScript exporter takes `dynamic_axes` (it records shape arithmetic as it traces).
Both give graphs whose first input's axes 2 and 3 are named `height` and `width`.

Saving: whatever the exporter wrote (the dynamo one puts weights in `<file>.data`, the TorchScript one
over 2 GiB writes one file per tensor, named after the tensor) is re-saved as one `<name>.onnx` with
inline weights, or, over protobuf's 2 GiB limit, with all weights in one `<name>.onnx.data` beside it:
named after the graph's own cache key, so graphs never share or overwrite weight files.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from ..controlnet import control_embedding_channels, run_controlnet_body
from ..models import ModelBundle
from ..prompt import KVCache, cross_attention_layers, install_kv_processors, precompute_kv
from ..temporal import PaddedBank
from .progress import heartbeat

logger = logging.getLogger(__name__)

EXPORTERS: tuple[str, ...] = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"
DEFAULT_OPSETS: dict[str, int] = {"dynamo": 18, "torchscript": 17}
# Protobuf cannot serialise a message of 2 GiB or more: past this, weights go to the external file.
MAX_INLINE_BYTES = (1 << 31) - 1
GRAPH_OUTPUT_NAMES: dict[str, str] = {"unet": "eps", "vae_encoder": "latents", "vae_decoder": "images"}
#: The networks with graphs: the single-output ones above and the ControlNet (its residuals, `residual_names`).
NETWORKS: tuple[str, ...] = ("unet", "vae_encoder", "vae_decoder", "controlnet")
# The names of a dynamic graph's height and width axes (of its first input): what TensorRT profiles are keyed by.
HEIGHT_AXIS, WIDTH_AXIS = "height", "width"
#: SDXL's added conditioning, in the order the UNet graph takes it (`Conditioning.added_cond` keys).
ADDED_COND_INPUTS: tuple[str, ...] = ("text_embeds", "time_ids")


#: The attention bank's inputs before its per-layer tensors (`bank_input_names`).
BANK_INPUTS: tuple[str, ...] = ("bank_mask", "injection_threshold", "injection_strength")
#: Per self-attention layer: the banked tensors in (inputs) and this call's out (outputs), in this order.
BANK_LAYER_INPUTS: tuple[str, ...] = ("bank_key", "bank_value", "bank_output")
BANK_LAYER_OUTPUTS: tuple[str, ...] = ("new_key", "new_value", "new_output")


def added_cond_inputs(unet: UNet2DConditionModel) -> tuple[str, ...]:
    """The added-conditioning inputs `unet` takes: `ADDED_COND_INPUTS` for SDXL's `text_time`, else none."""
    return ADDED_COND_INPUTS if getattr(unet.config, "addition_embed_type", None) == "text_time" else ()


def residual_shapes(unet: UNet2DConditionModel, rows: int, latent_height: int,
                    latent_width: int) -> list[tuple[int, ...]]:
    """The shapes of the ControlNet residuals `unet` takes for `rows` latents of this size: one per down-block
    output (`conv_in`, each resnet, each downsampler) and the mid block's, in `ControlResiduals.tensors` order.

    A ControlNet fitting `unet` (`controlnet.check_controlnet`) gives exactly these; they depend on the UNet alone.
    """
    height, width = latent_height, latent_width
    shapes = [(rows, int(unet.conv_in.out_channels), height, width)]
    channels = shapes[0][1]
    for block in unet.down_blocks:
        for resnet in block.resnets:
            channels = int(resnet.out_channels)
            shapes.append((rows, channels, height, width))
        for downsampler in block.downsamplers or ():
            # A stride-2 convolution of padding 1 (kernel 3) halves a side rounding up.
            height, width = (height + 1) // 2, (width + 1) // 2
            channels = int(downsampler.out_channels)
            shapes.append((rows, channels, height, width))
    shapes.append((rows, channels, height, width))
    return shapes


def residual_names(count: int) -> list[str]:
    """The names of `count` ControlNet residuals (the down ones, then the mid one): `down_residual_0` ...
    `down_residual_{count-2}`, `mid_residual`. The ControlNet graph's outputs and the UNet graph's extra inputs."""
    return [*(f"down_residual_{index}" for index in range(count - 1)), "mid_residual"]


def control_residual_names(unet: UNet2DConditionModel) -> list[str]:
    """The residual input names of `unet`'s graph with ControlNet inputs (see `residual_names`)."""
    return residual_names(len(residual_shapes(unet, 1, 8, 8)))


def self_attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """The UNet's self-attention modules by name, in module order: the layers an attention bank extends."""
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, Attention) and not module.is_cross_attention}


def bank_layer_shapes(unet: UNet2DConditionModel, rows: int, latent_height: int,
                      latent_width: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Per self-attention layer of `unet` (module order), one frame's key and value `(rows, heads, tokens, dim)` and
    attention output `(rows, tokens, channels)` for `rows` latents of this size.

    A down block's layers run at the latent size after the downsamplers before it, the mid block's after all of
    them, up block j's at down block (n − 1 − j)'s size (the skip it joins); a downsampler halves a side rounding up.
    """
    sizes = [(latent_height, latent_width)]
    for block in unet.down_blocks:
        height, width = sizes[-1]
        sizes.append(((height + 1) // 2, (width + 1) // 2) if block.downsamplers else (height, width))
    count = len(unet.down_blocks)
    shapes = {}
    for name, attn in self_attention_layers(unet).items():
        block, _, rest = name.partition(".")
        if block == "down_blocks":
            height, width = sizes[int(rest.split(".")[0])]
        elif block == "mid_block":
            height, width = sizes[count]
        elif block == "up_blocks":
            height, width = sizes[count - 1 - int(rest.split(".")[0])]
        else:
            raise ValueError(f"self-attention layer {name!r} is in no down, mid or up block")
        tokens, heads = height * width, attn.heads
        shapes[name] = ((rows, heads, tokens, attn.to_k.out_features // heads),
                        (rows, heads, tokens, attn.to_v.out_features // heads),
                        (rows, tokens, attn.to_out[0].out_features))
    return shapes


def bank_input_names(bank_layers: Sequence[str]) -> list[str]:
    """The attention bank's inputs of a UNet graph: `BANK_INPUTS`, then `<layer>.bank_key`, `.bank_value` and
    `.bank_output` of each layer; none without `bank_layers`."""
    if not bank_layers:
        return []
    return [*BANK_INPUTS, *(f"{layer}.{part}" for layer in bank_layers for part in BANK_LAYER_INPUTS)]


def graph_input_names(network: str, kv_layers: Sequence[str] = (), use_kv_cache: bool = False,
                      added_cond: Sequence[str] = (), residuals: Sequence[str] = (),
                      bank_layers: Sequence[str] = ()) -> list[str]:
    """The input names of a network's graph, in the order its tensors are passed.

    The UNet takes `latents`, `timesteps`, its `added_cond` inputs (SDXL: `text_embeds`, `time_ids`), then
    `<layer>.key` and `<layer>.value` of each layer in `kv_layers` (with the K/V cache) or
    `encoder_hidden_states` (without), then, in an engine with a ControlNet, the `residuals`
    (`control_residual_names`), then, in a graph with an attention bank, its inputs (`bank_input_names` of the
    self-attention `bank_layers`); the ControlNet takes `latents`, `timesteps`, the `added_cond` inputs,
    `encoder_hidden_states` and `control_embedding`; the VAE halves take `images` (encoder) or `latents` (decoder).
    Both the exporter and the TensorRT binding use these.
    """
    if network == "unet":
        bank = bank_input_names(bank_layers)
        if use_kv_cache:
            return ["latents", "timesteps", *added_cond,
                    *(f"{layer}.{part}" for layer in kv_layers for part in ("key", "value")), *residuals, *bank]
        return ["latents", "timesteps", *added_cond, "encoder_hidden_states", *residuals, *bank]
    if network == "controlnet":
        return ["latents", "timesteps", *added_cond, "encoder_hidden_states", "control_embedding"]
    if network == "vae_encoder":
        return ["images"]
    if network == "vae_decoder":
        return ["latents"]
    raise ValueError(f"unknown network {network!r}")


def graph_output_names(network: str, residuals: int = 0, bank_layers: Sequence[str] = ()) -> list[str]:
    """The output names of a network's graph: `GRAPH_OUTPUT_NAMES[network]` (for a UNet graph with an attention
    bank followed by `<layer>.new_key`, `.new_value` and `.new_output` of each of its `bank_layers`), or the
    ControlNet's `residuals` residuals (`residual_names`)."""
    if network == "controlnet":
        return residual_names(residuals)
    if network not in GRAPH_OUTPUT_NAMES:
        raise ValueError(f"unknown network {network!r}")
    bank = [f"{layer}.{part}" for layer in bank_layers for part in BANK_LAYER_OUTPUTS] if network == "unet" else []
    return [GRAPH_OUTPUT_NAMES[network], *bank]


def _added_cond_kwargs(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> dict:
    return {"added_cond_kwargs": dict(zip(names, inputs, strict=True))} if names else {}


def _split_residuals(inputs: Sequence[torch.Tensor], residuals: int) -> tuple[Sequence[torch.Tensor], dict]:
    """(the inputs before the last `residuals`, the UNet's keyword arguments for those last ones)."""
    if not residuals:
        return inputs, {}
    head, tail = inputs[:-residuals], inputs[-residuals:]
    return head, {"down_block_additional_residuals": list(tail[:-1]), "mid_block_additional_residual": tail[-1]}


def _split_bank(inputs: Sequence[torch.Tensor], bank_layers: Sequence[str]) -> tuple[Sequence[torch.Tensor],
                                                                                       PaddedBank | None]:
    """(the inputs before the attention bank's, a `PaddedBank` of those last ones); no bank without layers."""
    if not bank_layers:
        return inputs, None
    count = len(BANK_INPUTS) + len(BANK_LAYER_INPUTS) * len(bank_layers)
    head, tail = inputs[:-count], inputs[-count:]
    mask, threshold, strength = tail[:len(BANK_INPUTS)]
    tensors = tail[len(BANK_INPUTS):]
    width = len(BANK_LAYER_INPUTS)
    layers = {name: tuple(tensors[width * index:width * (index + 1)]) for index, name in enumerate(bank_layers)}
    return head, PaddedBank(layers, mask, threshold, strength)


def _with_bank_outputs(eps: torch.Tensor, bank: PaddedBank | None, bank_layers: Sequence[str]):
    """`eps`, or with a bank (eps, then each layer's key, value and output of this call)."""
    if bank is None:
        return eps
    missing = [name for name in bank_layers if len(bank.recorded.get(name, ())) != len(BANK_LAYER_OUTPUTS)]
    if missing:
        raise ValueError(f"self-attention layers {missing} did not reach the attention bank")
    return (eps, *(tensor for name in bank_layers for tensor in bank.recorded[name]))


class UNetGraph(torch.nn.Module):
    """The UNet as a function of its graph inputs (`graph_input_names`): (latents, timesteps[, text_embeds,
    time_ids], then K₀, V₀, K₁, V₁, … in `layer_names` order with `use_kv_cache`, else encoder_hidden_states[,
    residuals…][, attention bank…]). SDXL's added inputs only for an SDXL UNet; the `residuals` inputs are the
    ControlNet residuals, down ones then mid, only in an engine with a ControlNet.

    With the K/V cache the K/V tensors become the graph's inputs: the attention processors read them from
    `cross_attention_kwargs["kv_cache"]`, so the text projections are not in the graph at all. With `bank_layers`
    (the self-attention layers) the attention bank's inputs come last (`bank_input_names`) and the output is
    (eps, each layer's key, value and output of this call).
    """

    def __init__(self, unet: UNet2DConditionModel, use_kv_cache: bool, residuals: int = 0,
                 bank_layers: Sequence[str] = ()):
        super().__init__()
        if use_kv_cache or bank_layers:
            install_kv_processors(unet)  # the cache and the bank reach attention through these processors
        self.unet = unet
        self.use_kv_cache = use_kv_cache
        self.layer_names = list(cross_attention_layers(unet))
        self.cross_attention_dim = int(unet.config.cross_attention_dim)
        self.added_cond = added_cond_inputs(unet)
        self.residuals = residuals
        self.bank_layers = list(bank_layers)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, *inputs: torch.Tensor):
        inputs, bank = _split_bank(inputs, self.bank_layers)
        inputs, control = _split_residuals(inputs, self.residuals)
        added, text = inputs[:len(self.added_cond)], inputs[len(self.added_cond):]
        attention = {} if bank is None else {"temporal_bank": bank}
        if self.use_kv_cache:
            if len(text) != 2 * len(self.layer_names):
                raise ValueError(f"expected {2 * len(self.layer_names)} K/V tensors, got {len(text)}")
            attention["kv_cache"] = {name: (text[2 * i], text[2 * i + 1]) for i, name in enumerate(self.layer_names)}
            # Every cross-attention layer takes its K/V from the cache, so the text embeddings are never
            # read: a one-token placeholder satisfies the UNet's signature.
            encoder_hidden_states = latents.new_zeros(latents.shape[0], 1, self.cross_attention_dim)
        else:
            (encoder_hidden_states,) = text
        attention_kwargs = {"cross_attention_kwargs": attention} if attention else {}
        eps = self.unet(latents, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                        **_added_cond_kwargs(self.added_cond, added), **control, **attention_kwargs)[0]
        return _with_bank_outputs(eps, bank, self.bank_layers)


class ControlNetResiduals(torch.nn.Module):
    """The ControlNet as a function of (latents, timesteps[, text_embeds, time_ids], encoder_hidden_states,
    control_embedding) to its residuals at scale 1, down ones then mid (as `EagerRunner.controlnet`): its body
    (`engine.controlnet.controlnet_body`), which takes the embedded control images. Its own cross-attention
    projects the text: a ControlNet call has no K/V cache."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet
        self.added_cond = added_cond_inputs(controlnet)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, *inputs: torch.Tensor):
        *added, encoder_hidden_states, embedding = inputs
        residuals = run_controlnet_body(self.controlnet, latents, timesteps, encoder_hidden_states, embedding,
                                        dict(zip(self.added_cond, added, strict=True)) if self.added_cond else None)
        return tuple(residuals.tensors())


class VaeEncoder(torch.nn.Module):
    """Images in [-1, 1] to scaled latents, as `EagerRunner.encode`."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if isinstance(self.vae, AutoencoderTiny):
            latents = self.vae.encode(images).latents
        else:
            latents = self.vae.encode(images).latent_dist.mean
        return latents * self.scaling_factor


class VaeDecoder(torch.nn.Module):
    """Scaled latents to images in [-1, 1], as `EagerRunner.decode`."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1, 1)


# The dynamo exporter's graph optimizer logs every rewrite at info level.
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(max(each.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)


@dataclass(frozen=True)
class DynamicAxes:
    """A graph's first input with a dynamic height and width (axes 2 and 3), in that input's own units
    (latent rows and columns for the UNet and the decoder, pixels for the encoder).

    Args:
        multiple (`int`): every height and width is a multiple of this.
        min_size (`int`): the smallest height or width, a multiple of `multiple`.
        max_size (`int`): the largest height or width, a multiple of `multiple`.
    """

    multiple: int
    min_size: int
    max_size: int

    def __post_init__(self) -> None:
        if self.multiple < 1 or self.min_size % self.multiple or self.max_size % self.multiple \
                or not 0 < self.min_size <= self.max_size:
            raise ValueError(f"dynamic axes need 0 < min <= max, both multiples of {self.multiple}, got {self}")


@dataclass
class GraphSpec:
    """One network to export: the module, its named sample inputs (which fix the static shapes) and outputs.

    With `dynamic` the first input's height and width are left dynamic (the samples must lie in its range).
    """

    network: str
    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    output_names: tuple[str, ...]
    dynamic: DynamicAxes | None = None

    @property
    def batch(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def output_name(self) -> str:
        """The output of a single-output graph (the UNet's, the VAE halves')."""
        if len(self.output_names) != 1:
            raise ValueError(f"the {self.network} graph has {len(self.output_names)} outputs")
        return self.output_names[0]


def _graph_spec(network: str, module: torch.nn.Module, tensors: list[torch.Tensor], kv_layers: Sequence[str] = (),
                use_kv_cache: bool = False, added_cond: Sequence[str] = (), residuals: Sequence[str] = (),
                outputs: int = 0, bank_layers: Sequence[str] = ()) -> GraphSpec:
    names = graph_input_names(network, kv_layers, use_kv_cache, added_cond, residuals, bank_layers)
    return GraphSpec(network, module.eval(), dict(zip(names, tensors, strict=True)),
                     tuple(graph_output_names(network, outputs, bank_layers)))


def flat_key_values(unet: UNet2DConditionModel, kv_cache: KVCache) -> list[torch.Tensor]:
    """The cache's tensors in the graph's input order (K then V of each layer, in module order)."""
    return [tensor for name in cross_attention_layers(unet) for tensor in kv_cache[name]]


def _unet_samples(models: ModelBundle, batch: int, latent_height: int, latent_width: int,
                  sequence_length: int | None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Sample (latents, timesteps, SDXL's added inputs, text embeddings) of a UNet or ControlNet call."""
    unet = models.unet
    parameter = next(unet.parameters())
    sequence_length = sequence_length or models.tokenizer.model_max_length
    latents = torch.randn(batch, unet.config.in_channels, latent_height, latent_width,
                          device=parameter.device, dtype=parameter.dtype)
    timesteps = torch.arange(batch, device=parameter.device, dtype=torch.long) * 100 + 99
    text = torch.randn(batch, sequence_length, unet.config.cross_attention_dim,
                       device=parameter.device, dtype=parameter.dtype)
    added = []
    if added_cond_inputs(unet):
        # SDXL: the pooled embedding (what `projection_class_embeddings_input_dim` leaves beside the six time ids)
        # and the time ids of this latent size in pixels.
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        height, width = latent_height * 8, latent_width * 8
        added = [torch.randn(batch, pooled, device=parameter.device, dtype=parameter.dtype),
                 torch.tensor([[height, width, 0, 0, height, width]], device=parameter.device,
                              dtype=parameter.dtype).expand(batch, -1).contiguous()]
    return latents, timesteps, added, text


def _bank_samples(unet: UNet2DConditionModel, batch: int, latent_height: int, latent_width: int,
                  bank_size: int) -> list[torch.Tensor]:
    """Sample attention bank inputs (`bank_input_names` order) of `bank_size` frames, one slot empty."""
    parameter = next(unet.parameters())
    options = {"device": parameter.device, "dtype": parameter.dtype}
    mask = torch.zeros(bank_size, **options)
    mask[-1] = float("-inf")
    samples = [mask, torch.tensor([0.9], **options), torch.tensor([0.5], **options)]
    for shapes in bank_layer_shapes(unet, batch, latent_height, latent_width).values():
        for index, shape in enumerate(shapes):
            axis = 2 if index < 2 else 1
            samples.append(torch.randn(*shape[:axis], shape[axis] * bank_size, *shape[axis + 1:], **options))
    return samples


def unet_graph(models: ModelBundle, batch: int, latent_height: int, latent_width: int,
               use_kv_cache: bool, sequence_length: int | None = None, control: bool = False,
               bank_size: int = 0) -> GraphSpec:
    """The UNet at a static batch and latent size; K/V inputs shaped as `precompute_kv` makes them; with
    `control`, the ControlNet residuals (`residual_shapes`) after its usual inputs; with `bank_size`, an attention
    bank of that many frames last (`bank_input_names`) and each self-attention layer's tensors of this call as
    extra outputs (`graph_output_names`)."""
    unet = models.unet
    parameter = next(unet.parameters())
    latents, timesteps, added, text = _unet_samples(models, batch, latent_height, latent_width, sequence_length)
    added_names = added_cond_inputs(unet)
    residuals = [torch.randn(shape, device=parameter.device, dtype=parameter.dtype) * 0.1
                 for shape in residual_shapes(unet, batch, latent_height, latent_width)] if control else []
    names = control_residual_names(unet) if control else []
    bank_layers = list(self_attention_layers(unet)) if bank_size else []
    bank = _bank_samples(unet, batch, latent_height, latent_width, bank_size) if bank_size else []
    module = UNetGraph(unet, use_kv_cache, len(residuals), bank_layers)
    text_inputs = flat_key_values(unet, precompute_kv(unet, text)) if use_kv_cache else [text]
    return _graph_spec("unet", module, [latents, timesteps, *added, *text_inputs, *residuals, *bank],
                       module.layer_names, use_kv_cache=use_kv_cache, added_cond=added_names, residuals=names,
                       bank_layers=bank_layers)


def controlnet_graph(models: ModelBundle, batch: int, latent_height: int, latent_width: int,
                     sequence_length: int | None = None) -> GraphSpec:
    """The bundle's ControlNet at a static batch and latent size, taking the embedded control images
    (`engine.controlnet.embed_control` of images that size in pixels)."""
    if models.controlnet is None:
        raise ValueError("these models have no ControlNet to export")
    parameter = next(models.controlnet.parameters())
    latents, timesteps, added, text = _unet_samples(models, batch, latent_height, latent_width, sequence_length)
    embedding = torch.randn(batch, control_embedding_channels(models.controlnet), latent_height, latent_width,
                            device=parameter.device, dtype=parameter.dtype)
    outputs = len(residual_shapes(models.unet, batch, latent_height, latent_width))
    return _graph_spec("controlnet", ControlNetResiduals(models.controlnet),
                       [latents, timesteps, *added, text, embedding], added_cond=added_cond_inputs(models.unet),
                       outputs=outputs)


def vae_encoder_graph(models: ModelBundle, batch: int, height: int, width: int) -> GraphSpec:
    """The VAE encoder at a static batch and image size."""
    parameter = next(models.vae.parameters())
    images = torch.rand(batch, 3, height, width, device=parameter.device, dtype=parameter.dtype) * 2 - 1
    return _graph_spec("vae_encoder", VaeEncoder(models.vae), [images])


def vae_decoder_graph(models: ModelBundle, batch: int, latent_height: int, latent_width: int) -> GraphSpec:
    """The VAE decoder at a static batch and latent size."""
    parameter = next(models.vae.parameters())
    channels = int(models.unet.config.out_channels)
    latents = torch.randn(batch, channels, latent_height, latent_width, device=parameter.device, dtype=parameter.dtype)
    return _graph_spec("vae_decoder", VaeDecoder(models.vae), [latents])


def save_onnx(model, path: Path, max_inline_bytes: int | None = None) -> Path:
    """Save ONNX `model` to `path`: weights inline, or over `max_inline_bytes` (default `MAX_INLINE_BYTES`)
    all in one `<name>.data` beside it."""
    import onnx
    from google.protobuf.message import EncodeError

    max_inline_bytes = MAX_INLINE_BYTES if max_inline_bytes is None else max_inline_bytes
    try:
        inline = model.ByteSize() <= max_inline_bytes
    except EncodeError:
        # Over 2 GiB, protobuf cannot even size the message (the upb backend raises here).
        inline = False
    if inline:
        onnx.save_model(model, str(path))
    else:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data")
    return path


def dynamo_dynamic_shapes(spec: GraphSpec) -> tuple | None:
    """`torch.export`'s `dynamic_shapes` for `spec`: its first input's height and width as multiples of
    `spec.dynamic.multiple`, every other input static; None for a static spec.

    The structure follows `forward`'s signature: one entry per parameter, and for `*key_values` a tuple
    with an empty dict (all axes static) per tensor. A tuple of None there would be read as one input's
    axes by `torch.onnx.export` and fail to match.
    """
    if spec.dynamic is None:
        return None
    from torch.export import Dim

    dynamic = spec.dynamic
    blocks = {axis: Dim(f"{axis}_blocks", min=dynamic.min_size // dynamic.multiple,
                        max=dynamic.max_size // dynamic.multiple) for axis in (HEIGHT_AXIS, WIDTH_AXIS)}
    first = {2: dynamic.multiple * blocks[HEIGHT_AXIS], 3: dynamic.multiple * blocks[WIDTH_AXIS]}
    shapes: list = []
    for index, parameter in enumerate(inspect.signature(spec.module.forward).parameters.values()):
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            shapes.append(tuple({} for _ in range(len(spec.inputs) - index)))
            break
        shapes.append(first if index == 0 else None)
    return tuple(shapes)


def name_spatial_axes(model, input_name: str) -> None:
    """Rename the symbolic axes 2 and 3 of `model`'s input `input_name` to `HEIGHT_AXIS` and `WIDTH_AXIS`,
    everywhere in the graph (the dynamo exporter names them after its symbols, e.g. `8*height_blocks`)."""
    graph_input = next(value for value in model.graph.input if value.name == input_name)
    dims = graph_input.type.tensor_type.shape.dim
    renames = {dims[axis].dim_param: name for axis, name in ((2, HEIGHT_AXIS), (3, WIDTH_AXIS)) if dims[axis].dim_param}
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


def export_onnx(spec: GraphSpec, path: Path, exporter: str = DEFAULT_EXPORTER, opset: int | None = None,
                max_inline_bytes: int | None = None) -> Path:
    """Write `spec` to `path` as ONNX, with static shapes or `spec.dynamic`'s height and width; over
    `max_inline_bytes` its weights go to one `<name>.data` beside it (see `save_onnx`), and no other file
    is left behind."""
    import onnx

    if exporter not in EXPORTERS:
        raise ValueError(f"`exporter` must be one of {EXPORTERS}, got {exporter!r}")
    if spec.dynamic is not None and (spec.network == "controlnet" or "mid_residual" in spec.inputs):
        raise ValueError("ControlNet graphs (and the UNet's with residual inputs) are exported with static shapes "
                         "only: a resolution range does not take a ControlNet")
    if spec.dynamic is not None and BANK_INPUTS[0] in spec.inputs:
        raise ValueError("UNet graphs with an attention bank are exported with static shapes only")
    opset = opset or DEFAULT_OPSETS[exporter]
    shapes = ", ".join(f"{name}{list(tensor.shape)}" for name, tensor in list(spec.inputs.items())[:2])
    first_input = next(iter(spec.inputs))
    dynamic = "" if spec.dynamic is None else \
        f"; {first_input} height and width dynamic, {spec.dynamic.min_size}-{spec.dynamic.max_size}"
    logger.info("exporting %s to ONNX (%s exporter, opset %d; %s%s%s)", spec.network, exporter, opset, shapes,
                f", +{len(spec.inputs) - 2} more inputs" if len(spec.inputs) > 3 else "", dynamic)
    started = time.perf_counter()
    # The exporter writes into a private folder (its weight files are named after the tensors, so they
    # must not land beside other graphs); only the re-saved graph reaches `path`.
    with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as folder, \
            heartbeat(logger, f"exporting {spec.network}"):
        raw = Path(folder) / path.name
        with torch.no_grad(), warnings.catch_warnings(), _quiet_loggers(*_CHATTY_LOGGERS):
            # Both exporters warn about every shape assert they freeze: static shapes are the point of a static
            # graph, and a dynamic one is checked against eager at two sizes in the tests.
            warnings.simplefilter("ignore")
            dynamic_arguments = {}
            if spec.dynamic is not None and exporter == "dynamo":
                dynamic_arguments["dynamic_shapes"] = dynamo_dynamic_shapes(spec)
            elif spec.dynamic is not None:
                dynamic_arguments["dynamic_axes"] = {first_input: {2: HEIGHT_AXIS, 3: WIDTH_AXIS}}
            torch.onnx.export(
                spec.module,
                tuple(spec.inputs.values()),
                str(raw),
                input_names=list(spec.inputs),
                output_names=list(spec.output_names),
                opset_version=opset,
                dynamo=exporter == "dynamo",
                verbose=False,
                **dynamic_arguments,
            )
        model = onnx.load(str(raw))
        if spec.dynamic is not None:
            name_spatial_axes(model, first_input)
        save_onnx(model, path, max_inline_bytes)
    logger.info("exported %s in %.1f s", spec.network, time.perf_counter() - started)
    return path
