"""A two-stage pipeline-parallel UNet: the layout a stream takes when one GPU is not enough.

Stage 1 (device A): time embedding, `conv_in` and every down block. Stage 2 (device B): the mid block, every
up block and the output convolution. What crosses the boundary is the deepest down output, the time embedding
and every skip connection (`engine.skip.unet_split.HeadOutput`); both stages run diffusers' own blocks through
`engine.skip.unet_split`, so the result equals the single-device `unet(...)` call bit for bit on the same kind
of device. Each stage holds only its own blocks (a pruned copy of the UNet), as it would on its own GPU.

`PipelineSplitUNet.run_pipelined` overlaps the stages the way StreamDiffusionV2 / AsyncDiff do across frames:
two worker threads joined by a one-slot queue, so frame n's stage 2 runs while frame n+1's stage 1 does.
On CPU both "devices" may be `cpu`; docs/scale-out.md has the multi-GPU plan.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel

from .backends import EagerRunner
from .models import ModelBundle
from .prompt import Conditioning
from .skip.unet_split import HeadOutput, check_supported, run_down, run_head, run_mid_up, run_tail

logger = logging.getLogger(__name__)

#: Seconds a pipelined run waits for one stage to hand over a micro-batch before giving up.
STAGE_TIMEOUT_S = 300.0

# SDXL's added-conditioning embedding (`add_time_proj`, `add_embedding`) belongs to the time embedding.
_STAGE1_ONLY = ("conv_in", "time_proj", "time_embedding", "time_embed_act", "add_time_proj", "add_embedding",
                "down_blocks")
_STAGE2_ONLY = ("mid_block", "up_blocks", "conv_norm_out", "conv_act", "conv_out")


@dataclass(frozen=True)
class UNetCall:
    """One UNet call's inputs (a micro-batch of the pipeline)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    conditioning: Conditioning


def _conditioning_to(conditioning: Conditioning, device: torch.device) -> Conditioning:
    kv_cache = None
    if conditioning.kv_cache is not None:
        kv_cache = {name: (key.to(device), value.to(device)) for name, (key, value) in conditioning.kv_cache.items()}
    added = None
    if conditioning.added_cond is not None:
        added = {name: value.to(device) for name, value in conditioning.added_cond.items()}
    return Conditioning(conditioning.encoder_hidden_states.to(device), kv_cache, added)


def _boundary_to(boundary: HeadOutput, device: torch.device) -> HeadOutput:
    return HeadOutput(boundary.emb.to(device), boundary.hidden.to(device),
                      tuple(skip.to(device) for skip in boundary.skips), boundary.forward_upsample_size)


def _stage_copy(unet: UNet2DConditionModel, drop: Sequence[str], device: torch.device) -> UNet2DConditionModel:
    """A copy of `unet` without the modules of the other stage, on `device`."""
    dropped = {name: getattr(unet, name) for name in drop if hasattr(unet, name)}
    try:
        for name, module in dropped.items():
            # Empty stand-ins during the copy, so the other stage's weights are never duplicated.
            setattr(unet, name, torch.nn.ModuleList() if isinstance(module, torch.nn.ModuleList) else None)
        stage = copy.deepcopy(unet)
    finally:
        for name, module in dropped.items():
            setattr(unet, name, module)
    return stage.to(device).eval()


class PipelineSplitUNet:
    """`unet` split at the bottleneck over two devices.

    Args:
        unet (`UNet2DConditionModel`): a plain text-conditioned UNet (see `unet_split.check_supported`);
            it is copied, not modified.
        devices (`tuple[str, str]`, defaults to `("cpu", "cpu")`): the devices of stage 1 and stage 2.
    """

    def __init__(self, unet: UNet2DConditionModel, devices: tuple[str, str] = ("cpu", "cpu")):
        check_supported(unet)
        self.devices = (torch.device(devices[0]), torch.device(devices[1]))
        self.stage1 = _stage_copy(unet, _STAGE2_ONLY, self.devices[0])
        self.stage2 = _stage_copy(unet, _STAGE1_ONLY, self.devices[1])

    @torch.no_grad()
    def run_stage1(self, call: UNetCall) -> HeadOutput:
        """Stage 1 on device A; returns what crosses the boundary, already moved to device B."""
        device = self.devices[0]
        conditioning = _conditioning_to(call.conditioning, device)
        head = run_head(self.stage1, call.latents.to(device), call.timesteps.to(device), conditioning)
        return _boundary_to(run_down(self.stage1, head, conditioning), self.devices[1])

    @torch.no_grad()
    def run_stage2(self, boundary: HeadOutput, conditioning: Conditioning) -> torch.Tensor:
        """Stage 2 on device B: the UNet's output (on device B)."""
        conditioning = _conditioning_to(conditioning, self.devices[1])
        deep = run_mid_up(self.stage2, boundary, conditioning)
        return run_tail(self.stage2, boundary, deep, conditioning)

    def __call__(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """One call through both stages in turn (no overlap): the `NetworkRunner.unet` signature."""
        call = UNetCall(latents, timesteps, conditioning)
        return self.run_stage2(self.run_stage1(call), conditioning)

    def run_pipelined(self, calls: Sequence[UNetCall]) -> list[torch.Tensor]:
        """Run `calls` through two stage threads joined by a one-slot queue; outputs in call order.

        While stage 2 works on call n, stage 1 may already work on call n+1 (at most one boundary waits
        in between, as at most one activation set would sit in device B's receive buffer).

        Raises:
            RuntimeError: a stage failed (the original error is chained) or stalled for `STAGE_TIMEOUT_S`.
        """
        handover: queue.Queue = queue.Queue(maxsize=1)
        failures: list[BaseException] = []
        stop = threading.Event()

        def stage1_worker() -> None:
            try:
                for call in calls:
                    boundary = self.run_stage1(call)
                    while not stop.is_set():
                        try:
                            handover.put((boundary, call.conditioning), timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except Exception as error:  # handed to the caller below
                failures.append(error)
                stop.set()

        worker = threading.Thread(target=stage1_worker, name="pipeline-stage1", daemon=True)
        worker.start()
        outputs: list[torch.Tensor] = []
        try:
            deadline = time.monotonic() + STAGE_TIMEOUT_S
            while len(outputs) < len(calls):
                try:
                    boundary, conditioning = handover.get(timeout=0.1)
                except queue.Empty:
                    if failures:
                        raise RuntimeError("pipeline stage 1 failed") from failures[0]
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"pipeline stage 1 gave nothing for {STAGE_TIMEOUT_S} s") from None
                    continue
                outputs.append(self.run_stage2(boundary, conditioning))
                deadline = time.monotonic() + STAGE_TIMEOUT_S
        finally:
            stop.set()
            worker.join(timeout=STAGE_TIMEOUT_S)
        return outputs


class PipelineSplitRunner(EagerRunner):
    """`EagerRunner` whose UNet runs as a `PipelineSplitUNet` (the VAE stays on the first device).

    The split copies `models.unet` at the first UNet call, so it picks up what the engine set up on the UNet
    when it was built (the cached-K/V attention processors, memory modes).
    """

    def __init__(self, models: ModelBundle, devices: tuple[str, str] = ("cpu", "cpu")):
        super().__init__(models)
        self.devices = devices
        self._split: PipelineSplitUNet | None = None
        self._split_lock = threading.Lock()

    @property
    def split(self) -> PipelineSplitUNet:
        """The two-stage UNet (built on first use)."""
        with self._split_lock:
            if self._split is None:
                self._split = PipelineSplitUNet(self.models.unet, self.devices)
            return self._split

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self.split(latents, timesteps, conditioning).to(latents.device)
