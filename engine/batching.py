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
from contextlib import ExitStack

import torch

from .stream import StreamEngine
from .stream_state import FrameWork, StepResult
from .unet_call import run_calls


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
    # Only this call holds several streams at once, always entered in the same (id) order, so none can deadlock.
    order = sorted(range(len(engines)), key=lambda index: id(engines[index]))
    with ExitStack() as stack:
        held = {index: stack.enter_context(engines[index].denoising()) for index in order}
        if any(batch_key(engine) != batch_key(engines[0]) for engine in engines):
            # A parameter update between grouping and holding made them incompatible.
            raise ValueError("engines stopped being batch-compatible")
        calls = [held[index].prepare(frames[index]) for index in range(len(engines))]
        outputs = run_calls(engines[0].runner, calls)
        for index, (call, output) in enumerate(zip(calls, outputs, strict=True)):
            held[index].complete(frames[index], call, output)
