"""Cross-session batching: advance several `StreamEngine`s with one UNet call.

Every engine keeps its own state (prompt K/V, fixed and stock noise, latent buffer, similarity filter);
only the network calls are shared. The engines' UNet rows are concatenated along the batch, with a
`Conditioning` whose embeddings and per-layer K/V are the engines' own, concatenated the same way, and
the output is split back by rows. A session's output therefore equals its output alone up to the
floating-point order of batched convolutions.

Engines batch together when `batch_key` says so: same runner and loaded `Engine` (so the same models,
dtype, device and K/V mode), same frame size. With a ControlNet, the group's rows also share one ControlNet
call, each row's residuals scaled by its own session's `controlnet_scale`. Static-shape runners (ONNX Runtime, TensorRT,
`torch.compile`), skip policies and the sequential (non stream-batch) mode have no key: they always run
alone through `StreamEngine.step`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from .control.residuals import ControlResiduals, ControlRows
from .controlnet import with_control
from .prompt import Conditioning
from .stream import FrameWork, StepResult, StreamEngine


def batch_key(engine: StreamEngine) -> Hashable | None:
    """What must match for engines to share network calls; `None` when the engine must run alone."""
    config = engine.config
    # A `bank` stream's UNet call carries its own attention bank, and a stream that reuses ControlNet residuals
    # its own residuals: they run alone.
    reuses_control = engine.models.controlnet is not None and config.controlnet_reuse_interval > 1
    if not engine.runner.capabilities.dynamic_batch or engine.skip_policy is not None \
            or engine.temporal.bank is not None or reuses_control \
            or not config.stream_batch:
        return None
    return (id(engine.runner), id(engine.engine), config.width, config.height)


def concat_conditioning(conditionings: Sequence[Conditioning]) -> Conditioning:
    """One `Conditioning` for the concatenated rows: embeddings, each layer's K/V and SDXL's added inputs joined
    along the batch."""
    states = torch.cat([c.encoder_hidden_states for c in conditionings])
    first = conditionings[0]
    kv_cache = None
    if first.kv_cache is not None:
        kv_cache = {name: (torch.cat([c.kv_cache[name][0] for c in conditionings]),
                           torch.cat([c.kv_cache[name][1] for c in conditionings]))
                    for name in first.kv_cache}
    added = None
    if first.added_cond is not None:
        added = {name: torch.cat([c.added_cond[name] for c in conditionings]) for name in first.added_cond}
    control = None
    if first.control is not None:
        control = ControlResiduals.from_tensors([torch.cat(parts) for parts in
                                                 zip(*(c.control.tensors() for c in conditionings), strict=True)])
    return Conditioning(states, kv_cache, added, control=control)


@torch.no_grad()
def step_batch(engines: Sequence[StreamEngine], images: Sequence[torch.Tensor]) -> list[StepResult]:
    """`engines[i].step(images[i])` for every i, sharing the UNet calls of batch-compatible engines.

    Every input is checked before any stream advances, so a bad input raises `ValueError` and changes
    nothing. The VAE runs per frame, as in `engine.runtime`, where it overlaps the batched UNet call.
    """
    if len(engines) != len(images):
        raise ValueError(f"got {len(engines)} engines but {len(images)} inputs")
    _check_distinct(engines)
    for engine, image in zip(engines, images, strict=True):
        engine.check_input(image)
    frames = [engine.begin(image) for engine, image in zip(engines, images, strict=True)]
    error = next((error for error in advance_batch(engines, frames) if error is not None), None)
    if error is not None:
        raise error
    return [engine.finish(frame) for engine, frame in zip(engines, frames, strict=True)]


@torch.no_grad()
def advance_batch(engines: Sequence[StreamEngine], frames: Sequence[FrameWork]) -> list[Exception | None]:
    """`engines[i].advance(frames[i])` for every i, with one UNet call per group of batch-compatible engines.

    Engines are grouped by `batch_key`; a group of one, an engine without a key, a skipped frame or a frame
    encoded before its stream changed size runs its own `advance`. Returns each frame's error (`None` when it
    advanced): a failing group fails only its own frames.
    """
    if len(engines) != len(frames):
        raise ValueError(f"got {len(engines)} engines but {len(frames)} frames")
    _check_distinct(engines)
    groups: dict[Hashable, list[int]] = {}
    for index, (engine, frame) in enumerate(zip(engines, frames, strict=True)):
        key = batch_key(engine)
        if key is None or frame.skipped or not engine.fits(frame):
            key = ("alone", index)
        groups.setdefault(key, []).append(index)
    errors: list[Exception | None] = [None] * len(engines)
    for indices in groups.values():
        try:
            if len(indices) == 1:
                engines[indices[0]].advance(frames[indices[0]])
            else:
                _advance_group([engines[i] for i in indices], [frames[i] for i in indices])
        except Exception as error:  # reported per frame by the caller
            for index in indices:
                errors[index] = error
    return errors


def _check_distinct(engines: Sequence[StreamEngine]) -> None:
    if len({id(engine) for engine in engines}) != len(engines):
        raise ValueError("an engine may appear only once in a batch")


def _advance_group(engines: list[StreamEngine], frames: list[FrameWork]) -> None:
    # Only this call takes several engine locks, always in the same (id) order, so none can deadlock.
    locks = sorted((engine.lock for engine in engines), key=id)
    for lock in locks:
        lock.acquire()
    try:
        if any(batch_key(engine) != batch_key(engines[0]) for engine in engines):
            # A parameter update between grouping and locking made them incompatible.
            raise ValueError("engines stopped being batch-compatible")
        calls = [engine.prepare_denoise(frame) for engine, frame in zip(engines, frames, strict=True)]
        runner = engines[0].runner
        latents = torch.cat([call.latents for call in calls])
        timesteps = torch.cat([call.timesteps for call in calls])
        conditioning = concat_conditioning([call.conditioning for call in calls])
        if calls[0].control is not None:
            # One ControlNet call for the group, each row scaled by its own session's `controlnet_scale`.
            control = ControlRows.cat([call.control for call in calls])
            conditioning = with_control(runner, latents, timesteps, conditioning, control)
        model_output = runner.unet(latents, timesteps, conditioning)
        outputs = torch.split(model_output, [call.latents.shape[0] for call in calls])
        for engine, frame, call, output in zip(engines, frames, calls, outputs, strict=True):
            engine.complete_denoise(frame, call, output)
    finally:
        for lock in reversed(locks):
            lock.release()
