"""Cross-session batching: advance several `StreamEngine`s with one UNet call and one VAE call each way.

Every engine keeps its own state (prompt K/V, fixed and stock noise, latent buffer, similarity filter);
only the network calls are shared. The engines' UNet rows are concatenated along the batch, with a
`Conditioning` whose embeddings and per-layer K/V are the engines' own, concatenated the same way, and
the output is split back by rows. A session's output therefore equals its output alone up to the
floating-point order of batched convolutions.

Engines batch together when `batch_key` says so: same runner and model set, same frame size, dtype
and K/V mode. Static-shape runners (ONNX Runtime, TensorRT, `torch.compile`), skip policies and the
sequential (non stream-batch) mode have no key: they always run alone through `StreamEngine.step`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from .prompt import Conditioning
from .stream import FrameWork, StepResult, StreamEngine, UnetCall


def batch_key(engine: StreamEngine) -> Hashable | None:
    """What must match for engines to share network calls; `None` when the engine must run alone."""
    config = engine.config
    if not getattr(engine.runner, "dynamic_batch", False) or engine.skip_policy is not None \
            or not config.stream_batch:
        return None
    return (id(engine.runner), id(engine.models), config.width, config.height, engine.dtype, engine.device,
            config.use_kv_cache)


def concat_conditioning(conditionings: Sequence[Conditioning]) -> Conditioning:
    """One `Conditioning` for the concatenated rows: embeddings and each layer's K/V joined along the batch."""
    states = torch.cat([c.encoder_hidden_states for c in conditionings])
    first = conditionings[0].kv_cache
    if first is None:
        return Conditioning(states, None)
    kv_cache = {name: (torch.cat([c.kv_cache[name][0] for c in conditionings]),
                       torch.cat([c.kv_cache[name][1] for c in conditionings]))
                for name in first}
    return Conditioning(states, kv_cache)


@torch.no_grad()
def step_batch(engines: Sequence[StreamEngine], images: Sequence[torch.Tensor]) -> list[StepResult]:
    """`engines[i].step(images[i])` for every i, sharing the network calls of batch-compatible engines.

    Engines are grouped by `batch_key`; a group of one, or an engine without a key, runs its own `step`.
    Every input is checked before any stream advances, so a bad input raises `ValueError` and changes
    nothing.
    """
    if len(engines) != len(images):
        raise ValueError(f"got {len(engines)} engines but {len(images)} inputs")
    if len({id(engine) for engine in engines}) != len(engines):
        raise ValueError("an engine may appear only once in a batch")
    results: list[StepResult | None] = [None] * len(engines)
    groups: dict[Hashable, list[int]] = {}
    for index, engine in enumerate(engines):
        key = batch_key(engine)
        if key is None:
            key = ("alone", index)
        groups.setdefault(key, []).append(index)
    for indices in groups.values():
        if len(indices) == 1:
            results[indices[0]] = engines[indices[0]].step(images[indices[0]])
        else:
            group_results = _step_group([engines[i] for i in indices], [images[i] for i in indices])
            for index, result in zip(indices, group_results, strict=True):
                results[index] = result
    return results


def _step_group(engines: list[StreamEngine], images: list[torch.Tensor]) -> list[StepResult]:
    batches = [engine.check_input(image) for engine, image in zip(engines, images, strict=True)]
    # Only this call takes several engine locks, always in the same (id) order, so none can deadlock.
    locks = sorted((engine.lock for engine in engines), key=id)
    for lock in locks:
        lock.acquire()
    try:
        if any(batch_key(engine) != batch_key(engines[0]) for engine in engines):
            # A parameter update between grouping and locking made them incompatible.
            raise ValueError("engines stopped being batch-compatible")
        frames = [engine.begin_frame(batch) for engine, batch in zip(engines, batches, strict=True)]
        _advance([(engine, frame) for engine, frame in zip(engines, frames, strict=True) if not frame.skipped])
    finally:
        for lock in reversed(locks):
            lock.release()
    return [frame.result(single=image.dim() == 3) for frame, image in zip(frames, images, strict=True)]


def _advance(work: list[tuple[StreamEngine, FrameWork]]) -> None:
    """Encode, denoise and decode the frames that the similarity filter let through, in shared calls."""
    if not work:
        return
    runner = work[0][0].runner
    encoded = runner.encode(torch.cat([frame.images for _, frame in work]))
    latents = torch.split(encoded, [frame.images.shape[0] for _, frame in work])
    calls: list[UnetCall] = []
    for (engine, frame), frame_latents in zip(work, latents, strict=True):
        engine.prime_if_empty(frame, frame_latents)
        calls.append(engine.stream_unet_call(frame, frame_latents))
    model_output = runner.unet(torch.cat([call.latents for call in calls]),
                               torch.cat([call.timesteps for call in calls]),
                               concat_conditioning([call.conditioning for call in calls]))
    outputs = torch.split(model_output, [call.latents.shape[0] for call in calls])
    denoised = [engine.finish_stream_call(frame, call, output)
                for (engine, frame), call, output in zip(work, calls, outputs, strict=True)]
    decoded = runner.decode(torch.cat(denoised))
    for (engine, frame), images in zip(work, torch.split(decoded, [d.shape[0] for d in denoised]), strict=True):
        engine.finish_frame(frame, images)

