"""ControlNet in the stream batch: loading, per-row residuals, and reusing them across frames.

Each stream-batch slot holds a frame from a different time, so each slot keeps the control image of its own
frame: the control images travel through the stream's buffer beside the latents (`StreamEngine`), and every UNet
row gets the ControlNet residuals of its own latent, timestep and control image. The residuals are computed at
scale 1 and multiplied per row by the row's `controlnet_scale`, so sessions with different scales share one
ControlNet call (`engine.batching`) and each row equals its session's output alone.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import weakref
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from .control import DEMO_CONTROLNET_DIR
from .control.residuals import ControlResiduals, ControlRows
from .models import ModelLoadError
from .prompt import Conditioning

logger = logging.getLogger(__name__)

#: The `controlnet` spec of the demo model's small canny ControlNet (package data, `engine/demo_controlnet/`).
DEMO_CONTROLNET = "demo"
#: The `controlnet` spec of a seeded random ControlNet made from the loaded UNet (`random_controlnet`), for tests and
#: benchmarks: a ControlNet's cost and the engine's exactness without any download.
RANDOM_CONTROLNET = "random"


def embed_control(controlnet: ControlNetModel, images: torch.Tensor) -> torch.Tensor:
    """The ControlNet's condition embedding of control images `[rows, 3, H, W]` in [0, 1]: what its forward adds
    to the `conv_in` output, `[rows, block_out_channels[0], H / 8, W / 8]`.

    It depends on the control image alone, not on the latent, timestep or prompt, so the engine computes it once
    per frame on the input stage and every slot and guidance row reuses it (`controlnet_body`). It is a stack of
    full-resolution convolutions: most of a small ControlNet's cost (the demo's: 82 of 111 ms for 4 rows at 256²).
    """
    if controlnet.config.controlnet_conditioning_channel_order == "bgr":
        images = torch.flip(images, dims=[1])
    return controlnet.controlnet_cond_embedding(images)


def control_embedding_channels(controlnet: ControlNetModel) -> int:
    """Channels of `embed_control`'s output (the ControlNet's first block width)."""
    return int(controlnet.config.block_out_channels[0])


_bodies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_bodies_lock = threading.Lock()


def controlnet_body(controlnet: ControlNetModel) -> ControlNetModel:
    """`controlnet` taking its embedded control image (`embed_control`) where diffusers' forward takes the image.

    A shallow copy sharing every module and weight of `controlnet`, whose condition embedding is the identity; the
    original is not changed (streams share it). One per ControlNet. Call it through `run_controlnet_body`, which
    undoes the channel flip a `bgr` ControlNet's forward applies to its condition.
    """
    with _bodies_lock:
        body = _bodies.get(controlnet)
        if body is None:
            body = copy.copy(controlnet)
            body._modules = dict(controlnet._modules)  # its own module table: the original keeps its embedding
            body.controlnet_cond_embedding = torch.nn.Identity()
            _bodies[controlnet] = body
        return body


def run_controlnet_body(controlnet: ControlNetModel, latents: torch.Tensor, timesteps: torch.Tensor,
                        encoder_hidden_states: torch.Tensor, embedding: torch.Tensor,
                        added_cond: dict[str, torch.Tensor] | None = None) -> ControlResiduals:
    """`controlnet`'s residuals at scale 1 for UNet rows and their embedded control images (`embed_control`):
    exactly diffusers' `ControlNetModel.forward` on the control images."""
    if controlnet.config.controlnet_conditioning_channel_order == "bgr":
        embedding = torch.flip(embedding, dims=[1])  # the body's forward flips its condition back
    down, mid = controlnet_body(controlnet)(latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                            controlnet_cond=embedding, conditioning_scale=1.0,
                                            added_cond_kwargs=added_cond, return_dict=False)
    return ControlResiduals(tuple(down), mid)


def with_control(runner, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning,
                 control: ControlRows | None) -> Conditioning:
    """`conditioning` with the ControlNet residuals of these UNet rows, scaled per row; unchanged without control
    rows or when every row's scale is 0 (the ControlNet is then not run at all)."""
    if control is None or not control.active:
        return conditioning
    residuals = runner.controlnet(latents, timesteps, conditioning, control.embeddings)
    return dataclasses.replace(conditioning, control=residuals.scaled(control.scale))


def check_controlnet(controlnet: ControlNetModel, unet: UNet2DConditionModel, source: str) -> None:
    """Raise `ModelLoadError` when `controlnet`'s residuals cannot fit `unet` (another family or width)."""
    wanted = {"block_out_channels": tuple(unet.config.block_out_channels),
              "cross_attention_dim": unet.config.cross_attention_dim,
              "in_channels": unet.config.in_channels,
              "layers_per_block": unet.config.layers_per_block,
              "addition_embed_type": getattr(unet.config, "addition_embed_type", None)}
    got = {name: getattr(controlnet.config, name, None) for name in wanted}
    got["block_out_channels"] = tuple(got["block_out_channels"] or ())
    different = {name: (got[name], value) for name, value in wanted.items() if got[name] != value}
    if different:
        detail = ", ".join(f"{name} {mine} (the UNet's: {theirs})" for name, (mine, theirs) in different.items())
        raise ModelLoadError(f"ControlNet {source!r} does not fit this model: {detail}. Pass a ControlNet trained for "
                             "this model's family (e.g. an SD 1.5 ControlNet for an SD 1.5 checkpoint).")


def random_controlnet(unet: UNet2DConditionModel, seed: int = 0) -> ControlNetModel:
    """A ControlNet of `unet`'s architecture (`ControlNetModel.from_unet`, its weights copied) whose zero
    convolutions and condition embedding are seeded random instead of zero, so its residuals change the output."""
    channels = tuple(min(16 * 2 ** i, 64) for i in range(4))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    generator = torch.Generator().manual_seed(seed)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            fan_in = conv.weight[0].numel()
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.5 / fan_in ** 0.5)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.01)
    dtype = next(unet.parameters()).dtype
    return controlnet if dtype == torch.float32 else controlnet.to(dtype=dtype)


def load_controlnet(spec: str, unet: UNet2DConditionModel) -> ControlNetModel:
    """The `ControlNetModel` of `spec` (`demo`, `random`, a local diffusers folder or a hub id), checked against
    `unet`.

    Raises:
        ModelLoadError: naming what was tried and what to do instead.
    """
    if spec == RANDOM_CONTROLNET:
        return random_controlnet(unet)
    path = DEMO_CONTROLNET_DIR if spec == DEMO_CONTROLNET else Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"ControlNet folder {spec!r} has no config.json: pass a folder saved with "
                                 "`ControlNetModel.save_pretrained`, or a hub id such as "
                                 "lllyasviel/sd-controlnet-canny")
        source, local_only = str(path), True
    else:
        source, local_only = spec, False
    logger.info("loading ControlNet %r", spec)
    try:
        controlnet = ControlNetModel.from_pretrained(source, local_files_only=local_only)
    except Exception as error:  # diffusers raises OSError, ValueError or hub errors here
        where = "the folder" if local_only else "the hub (or the local hub cache)"
        raise ModelLoadError(f"could not load ControlNet {spec!r} from {where}: {type(error).__name__}: {error}. "
                             "Pass `--controlnet` a local ControlNetModel folder, a reachable hub id, or `demo`.") \
            from error
    check_controlnet(controlnet, unet, spec)
    return controlnet


class ResidualReuse:
    """One stream's last ControlNet residuals, reused while the control image barely moves
    (`controlnet_reuse_interval`, `controlnet_reuse_threshold`; StreamDiffusionTD's `cn_cache_interval` idea).

    The residuals are kept at scale 1, so a reused call still follows a hot `controlnet_scale` change. They are
    reused for at most `interval - 1` frames after they were computed, and only while the newest slot's control
    image differs from the one they were computed with by at most `threshold` (mean absolute change).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the residuals (a new prompt, size or reset: they no longer fit)."""
        self._residuals: ControlResiduals | None = None
        self._reference: torch.Tensor | None = None
        self._age = 0

    def lookup(self, newest: torch.Tensor, rows: int, interval: int, threshold: float) -> ControlResiduals | None:
        """The kept residuals when they may serve a call of `rows` rows whose newest control image is `newest`."""
        residuals, reference = self._residuals, self._reference
        if residuals is None or interval <= 1 or residuals.rows != rows or self._age + 1 >= interval \
                or reference.shape != newest.shape:
            return None
        if float((newest - reference).abs().mean()) > threshold:
            return None
        self._age += 1
        return residuals

    def store(self, residuals: ControlResiduals, newest: torch.Tensor) -> None:
        """Keep freshly computed residuals and the newest control image they saw."""
        self._residuals, self._reference, self._age = residuals, newest, 0
