"""The engine's contract with the server: `StreamRuntime` loads once, opens streams and pipelines their frames.

In the spirit of livepeer/ai-runner's small pipeline interface, the server needs only this:
- `StreamRuntime.load(load_config, defaults, options)`: load and prepare the shared models once, warm up;
- `open_stream(...)` → `StreamHandle` (`engine.handle`): `put` encoded frames, `get` answers, `update`
  parameters, `close`;
- `status()` → `RuntimeStatus`: state, fps in and out, and the counters (each fact counted once, here);
- `close()`.

Threads run the engine's three stages as a pipeline, so the VAE calls of one frame overlap the UNet call of
another: two input threads (bytes → tensor → `StreamEngine.begin`: similarity filter, VAE encode; each
stream on one of them at a time, the stream that used them least recently first), the inference thread
(`advance`: the stream-batch UNet call, serving streams round-robin, up to `max_batch` streams' frames per
batched call, see `engine.batching`) and the output thread (`finish`: VAE decode, then tensor → JPEG). Each
stream holds at most `max_in_flight` accepted frames that it has not yet taken back; past that, a new frame
replaces the oldest waiting one (latest wins) and the replaced frame is answered as dropped. Order is kept
per stream, and every frame carries its arrival time so latency is measured end to end.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .batching import advance_batch, batch_key
from .codec import (
    BAD_IMAGE,
    INFERENCE_FAILED,
    FrameError,
    ImageDecodeError,
    decode_image,
    encode_jpeg,
    rgb_to_tensor,
    tensor_to_rgb,
)
from .config import LoadConfig, RuntimeOptions, StreamConfig
from .flow_control import BatchLimit, BatchPick, is_out_of_memory, least_used, round_robin_batch
from .handle import Answer, Dropped, FrameResult, Job, StreamHandle, StreamStats
from .loading import Engine
from .stream import StreamEngine

logger = logging.getLogger(__name__)

__all__ = ["INPUT_THREADS", "MODEL_THREADS", "Answer", "Dropped", "FrameResult", "RuntimeOptions", "RuntimeStatus",
           "StreamHandle", "StreamRuntime", "StreamStats"]

#: Input threads (decode + VAE encode). Two, so that one stream's expensive frames (a stream is decoded by
#: one input thread at a time) can never hold up every other stream's input.
INPUT_THREADS = 2
#: Threads that run models at the same time: the input threads (VAE encode), UNet, VAE decode.
MODEL_THREADS = INPUT_THREADS + 2
#: Seconds over which `RuntimeStatus.fps_in` and `fps_out` are measured.
RATE_WINDOW_S = 5.0


@dataclass(frozen=True)
class RuntimeStatus:
    """What the runtime knows about itself (`StreamRuntime.status`).

    `failure` names what stopped it (a dead runtime thread), else None. Counters are totals since the runtime
    started, over every stream it served. `fps_in` (frames taken into the input stage) and `fps_out` (outputs)
    cover the last `RATE_WINDOW_S` seconds, over all streams. `last_error_at` is when the last inference error
    happened (`time.monotonic()`), `behind_s` how long the oldest frame of any open stream has waited for its
    answer.
    """

    model: str
    streams: int
    failure: str | None
    fps_in: float
    fps_out: float
    frames_in: int
    frames_out: int
    dropped: int
    skipped: int
    errors: int
    errors_by_code: dict[str, int]
    inference_errors: int
    last_error: str | None
    last_error_at: float | None
    behind_s: float
    batch_limit: int
    batches: int
    frames_inferred: int
    mean_inference_s: float | None


class _RateMeter:
    """Events per second over the last `window_s` seconds (bounded memory)."""

    def __init__(self, window_s: float = RATE_WINDOW_S, capacity: int = 4096):
        self.window_s = window_s
        self._stamps: deque[float] = deque(maxlen=capacity)

    def mark(self, now: float) -> None:
        self._stamps.append(now)

    def rate(self, now: float) -> float:
        recent = [stamp for stamp in self._stamps if now - stamp <= self.window_s]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(now - recent[0], 1e-9)


@dataclass
class _Health:
    inference_errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    frames_inferred: int = 0
    #: Network passes run (each advances one frame, or up to `max_batch` frames with batching).
    batches: int = 0
    inference_s: deque = field(default_factory=lambda: deque(maxlen=100))
    #: Runtime threads that stopped on an unexpected error, by name, with the error.
    dead_threads: dict[str, str] = field(default_factory=dict)


class StreamRuntime:
    """Streams sharing one loaded `Engine`, its input, inference and output threads.

    Args:
        engine (`Engine`): the shared models and runner (`Engine.load`, or `StreamRuntime.load`).
        defaults (`StreamConfig`, *optional*): every stream's starting parameters; `open_stream` may override.
        options (`RuntimeOptions`, *optional*): JPEG quality, pixel limit, batching.
    """

    def __init__(self, engine: Engine, defaults: StreamConfig | None = None, options: RuntimeOptions | None = None):
        self.engine = engine
        self.defaults = defaults if defaults is not None else StreamConfig()
        self.options = options if options is not None else RuntimeOptions()
        self._health = _Health()
        self._streams: list[StreamHandle] = []
        self._lock = threading.Condition()
        self._last_served = -1
        #: Streams per UNet call now: `max_batch`, lowered when a shared call runs out of memory.
        self._batch_limit = BatchLimit(self.options.max_batch)
        #: Seconds of the last UNet batch without priming: usages closer than this count as even.
        self._last_batch_s = 0.0
        self._last_decoded = -1
        self._encode_queue: queue.Queue = queue.Queue()
        self._stopping = False
        # Totals of closed streams, so `status` counts every frame the runtime served exactly once.
        self._closed_totals: dict[str, int] = {}
        self._closed_errors: dict[str, int] = {}
        self._fps_in, self._fps_out = _RateMeter(), _RateMeter()
        loops = [(f"stream-decode-{index}", self._decode_loop) for index in range(INPUT_THREADS)]
        loops += [("stream-inference", self._inference_loop), ("stream-encode", self._encode_loop)]
        self._threads = [threading.Thread(target=self._guarded, args=(loop,), name=name, daemon=True)
                         for name, loop in loops]
        for thread in self._threads:
            thread.start()

    @classmethod
    def load(cls, config: LoadConfig, defaults: StreamConfig | None = None, options: RuntimeOptions | None = None,
             warmup: bool = True) -> StreamRuntime:
        """Load `config`'s models, prepare their backend, start the threads and (with `warmup`) run one frame.

        Raises:
            ModelLoadError, BackendUnavailableError, ValueError: the models or backend cannot be made ready.
            RuntimeError: the warm-up frame failed.
        """
        runtime = cls(Engine.load(config, defaults), defaults, options)
        if warmup:
            try:
                runtime.warm_up()
            except BaseException:
                runtime.close()
                raise
        return runtime

    @property
    def model_name(self) -> str:
        return self.engine.name

    # ------------------------------------------------------------------ streams

    @property
    def streams(self) -> list[StreamHandle]:
        with self._lock:
            return list(self._streams)

    def open_stream(self, max_in_flight: int = 2, notify: Callable[[], None] | None = None,
                    **params) -> StreamHandle:
        """A new stream with its own state, from the runtime's defaults with `params` (flat names) changed.

        Encodes the stream's prompt (and may open compiled graphs): call it off an event loop.

        Raises:
            ValueError: an unknown, load-time or invalid parameter.
        """
        engine = StreamEngine(self.engine, self.defaults.updated(**params))
        handle = StreamHandle(engine, max_in_flight, self._lock, notify, on_close=self._forget)
        with self._lock:
            self._streams.append(handle)
        return handle

    def warm_up(self, timeout: float = 300.0) -> float:
        """Run one grey frame through a throwaway stream so the first client is not the one who waits;
        returns its seconds.

        Raises:
            RuntimeError: the frame failed or timed out.
        """
        started = time.perf_counter()
        config = self.defaults
        handle = self.open_stream(max_in_flight=1)
        try:
            handle.put(encode_jpeg(np.full((config.height, config.width, 3), 128, np.uint8)))
            answer = handle.get(timeout)
            if not isinstance(answer, FrameResult) or answer.error is not None:
                why = "timed out" if answer is None else getattr(answer.error, "message", "dropped")
                raise RuntimeError(f"warm-up frame failed: {why}")
        finally:
            handle.close()
        return time.perf_counter() - started

    def _forget(self, handle: StreamHandle) -> None:
        stats = handle.stats
        with self._lock:
            if handle in self._streams:
                self._streams.remove(handle)
            for name in ("frames_in", "frames_out", "dropped", "skipped"):
                self._closed_totals[name] = self._closed_totals.get(name, 0) + getattr(stats, name)
            for code, count in stats.errors_by_code.items():
                self._closed_errors[code] = self._closed_errors.get(code, 0) + count

    def status(self) -> RuntimeStatus:
        """State and counters now (see `RuntimeStatus`)."""
        now = time.monotonic()
        with self._lock:
            streams = list(self._streams)
            totals = dict(self._closed_totals)
            errors = dict(self._closed_errors)
        for handle in streams:
            stats = handle.stats
            for name in ("frames_in", "frames_out", "dropped", "skipped"):
                totals[name] = totals.get(name, 0) + getattr(stats, name)
            for code, count in stats.errors_by_code.items():
                errors[code] = errors.get(code, 0) + count
        health = self._health
        inference = list(health.inference_s)
        return RuntimeStatus(
            model=self.model_name, streams=len(streams), failure=self.failure,
            fps_in=self._fps_in.rate(now), fps_out=self._fps_out.rate(now),
            frames_in=totals.get("frames_in", 0), frames_out=totals.get("frames_out", 0),
            dropped=totals.get("dropped", 0), skipped=totals.get("skipped", 0), errors=sum(errors.values()),
            errors_by_code=errors, inference_errors=health.inference_errors, last_error=health.last_error,
            last_error_at=health.last_error_at, batch_limit=self._batch_limit.limit,
            behind_s=max((handle.behind_s(now) for handle in streams), default=0.0),
            batches=health.batches, frames_inferred=health.frames_inferred,
            mean_inference_s=sum(inference) / len(inference) if inference else None,
        )

    # ------------------------------------------------------------------ threads

    def _guarded(self, loop: Callable[[], None]) -> None:
        """Run one of the runtime's loops; if it ever stops on an error, say so in `health` and the log.

        Each loop answers a failing frame and goes on, so this only catches a bug in the loop itself:
        every stream would stall, which `failure` reports (the server's `/health` says `error`).
        """
        try:
            loop()
        except Exception as error:
            name = threading.current_thread().name
            self._health.dead_threads[name] = f"{type(error).__name__}: {error}"
            logger.critical("runtime thread %s stopped: every stream is stalled", name, exc_info=error)

    @property
    def failure(self) -> str | None:
        """Why the runtime cannot serve frames any more (a dead thread), or `None` while it can."""
        if self._stopping:
            return None
        dead = dict(self._health.dead_threads)
        dead.update({thread.name: "not running" for thread in self._threads
                     if not thread.is_alive() and thread.name not in dead})
        if not dead:
            return None
        return "runtime thread " + "; ".join(f"{name} stopped ({why})" for name, why in dead.items())

    def _decode_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and (work := self._next_undecoded()) is None:
                    self._lock.wait()
                if self._stopping:
                    return
                handle, job = work
                self._last_decoded = self._streams.index(handle)
                handle.in_input_stage = job.started = True
                config = handle.engine.config
            self._fps_in.mark(time.monotonic())
            started = time.perf_counter()
            self._input_stage(handle, job, config)
            with self._lock:
                handle.input_usage.add(time.perf_counter() - started, time.monotonic())
                handle.in_input_stage = False
                self._lock.notify_all()

    def _input_stage(self, handle: StreamHandle, job: Job, config: StreamConfig) -> None:
        """Decode one frame and run the engine's first stage; any failure becomes that frame's error.

        `job.frame` or `job.error` is set last: the inference thread takes the job as soon as either is.
        """
        data, job.data = job.data, b""
        try:
            image = rgb_to_tensor(decode_image(data, config.width, config.height, self.options.max_pixels))
        except ImageDecodeError as error:
            job.error = error
            return
        except Exception as error:  # a decoder bug must cost this frame only, never the shared thread
            logger.warning("decoding a frame failed unexpectedly", exc_info=error)
            job.error = ImageDecodeError(BAD_IMAGE, f"not a decodable image: {type(error).__name__}: {error}")
            return
        started = time.perf_counter()
        try:
            frame = handle.engine.begin(image)
        except Exception as error:  # e.g. the stream changed size after the image was decoded
            job.error = self._model_error("VAE encode", error)
            return
        job.model_s = time.perf_counter() - started
        job.frame = frame

    def _model_error(self, stage: str, error: Exception) -> FrameError:
        """Log and count a failing model stage; the frame is answered with an `inference_failed` error."""
        logger.error("%s failed", stage, exc_info=error)
        self._health.inference_errors += 1
        self._health.last_error = f"{type(error).__name__}: {error}"
        self._health.last_error_at = time.monotonic()
        return FrameError(INFERENCE_FAILED, f"inference failed: {error}")

    def _next_undecoded(self) -> tuple[StreamHandle, Job] | None:
        now = time.monotonic()
        index = least_used(self._streams, self._last_decoded, lambda h: h.next_undecoded() is not None,
                           lambda h: h.input_usage.at(now))
        if index is None:
            return None
        handle = self._streams[index]
        return handle, handle.next_undecoded()

    def _inference_loop(self) -> None:
        while True:
            with self._lock:
                pick = None
                while not self._stopping and pick is None:
                    if (pick := self._next_batch()) is None:
                        self._lock.wait()
                    else:
                        pick = self._gather(pick)
                if self._stopping:
                    return
                self._last_served = pick.after
                batch = [(self._streams[index], self._streams[index].pop_head()) for index in pick.indices]
            self._infer(batch)

    def _next_batch(self) -> BatchPick | None:
        now = time.monotonic()
        return round_robin_batch(self._streams, self._last_served, StreamHandle.head_decoded,
                                 # A frame that primes again runs alone: no other stream waits for its priming.
                                 lambda h: None if h.engine.needs_repriming else batch_key(h.engine),
                                 self._batch_limit.limit,
                                 usage=lambda h: h.inference_usage.at(now), tolerance=self._last_batch_s)

    def _gather(self, pick: BatchPick) -> BatchPick | None:
        """Let a partial batch wait up to `batch_wait_s` for compatible frames still in the input stage.

        On a saturated machine a fuller batch costs less UNet time per frame; the wait stops at once when
        the batch fills or no compatible stream has a frame on its way. `None` if the streams changed
        so that nothing is ready any more. Called with `_lock` held.
        """
        deadline = time.monotonic() + self.options.batch_wait_s
        while not self._stopping and pick is not None and len(pick.indices) < self._batch_limit.limit \
                and self._frames_coming(pick) and (remaining := deadline - time.monotonic()) > 0:
            self._lock.wait(remaining)
            pick = self._next_batch()
        return pick

    def _frames_coming(self, pick: BatchPick) -> bool:
        """Whether a stream outside `pick`, batchable with its leader, has its next frame in the input stage."""
        key = batch_key(self._streams[pick.indices[0]].engine)
        if key is None:
            return False
        return any(index not in pick.indices and handle.head_in_input_stage() and batch_key(handle.engine) == key
                   for index, handle in enumerate(self._streams))

    def _infer(self, batch: list[tuple[StreamHandle, Job]]) -> None:
        """Advance one frame per stream, in one batched UNet call when there are several."""
        ready = [(handle, job) for handle, job in batch if job.error is None]
        try:
            if ready:
                primed_before = [handle.engine.priming_s for handle, _ in ready]
                started = time.perf_counter()
                errors = advance_batch([handle.engine for handle, _ in ready], [job.frame for _, job in ready])
                elapsed = time.perf_counter() - started
                self._charge(ready, primed_before, elapsed)
                self._follow_memory(len(ready), errors)
                self._health.batches += 1
                for (_, job), error in zip(ready, errors, strict=True):
                    job.model_s += elapsed
                    if error is None:
                        self._health.frames_inferred += 1
                    else:
                        job.error = self._model_error("inference", error)
        except Exception as error:  # a bug outside the per-group handling still costs only these frames
            failure = self._model_error("inference", error)
            for _, job in ready:
                job.error = job.error or failure
        finally:
            for handle, job in batch:
                self._encode_queue.put((handle, job))

    def _follow_memory(self, batch: int, errors: list[Exception | None]) -> None:
        """Lower the batch limit when a shared call ran out of memory (its frames are answered with the error);
        raise it again slowly while shared calls go through."""
        if batch > 1 and any(error is not None and is_out_of_memory(error) for error in errors):
            self._batch_limit.out_of_memory(batch)
            logger.warning("a UNet call of %d streams ran out of memory: at most %d per call from now on", batch,
                           self._batch_limit.limit)
        elif not any(errors):
            self._batch_limit.succeeded(batch)

    def _charge(self, ready: list[tuple[StreamHandle, Job]], primed_before: list[float], elapsed: float) -> None:
        """Record each stream's share of one batch's time: the batched call split evenly, and the priming a
        stream asked for (a re-prepare or reset refills its buffer with n - 1 calls) charged to that stream
        alone. A new stream's first priming is part of opening it and charged to no one, so streams of equal
        cost stay even."""
        primed = [handle.engine.priming_s - before for (handle, _), before in zip(ready, primed_before, strict=True)]
        batch_s = max(0.0, elapsed - sum(primed))
        # Usages within one batch's time count as even: equal streams keep strict turns.
        self._last_batch_s = batch_s
        now = time.monotonic()
        for (handle, _), own in zip(ready, primed, strict=True):
            handle.inference_usage.add(batch_s / len(ready) + (own if handle.engine.frames_processed else 0.0), now)

    def _encode_loop(self) -> None:
        while True:
            item = self._encode_queue.get()
            if item is None:
                return
            handle, job = item
            result = FrameResult(seq=job.seq, arrival=job.arrival, error=job.error)
            if job.error is None:
                started = time.perf_counter()
                try:
                    step = handle.engine.finish(job.frame)
                    job.model_s += time.perf_counter() - started
                    result.jpeg = encode_jpeg(tensor_to_rgb(step.images), self.options.jpeg_quality)
                except Exception as error:  # a failing frame must not kill the worker
                    result.error = self._model_error("VAE decode", error)
                else:
                    result.skipped = step.skipped
                    result.inference_s = job.model_s
                    self._health.inference_s.append(job.model_s)
            result.done = time.monotonic()
            if result.error is None:
                self._fps_out.mark(result.done)
            handle.deliver(result)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every thread and wait for them (frames still waiting are discarded)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._encode_queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
        for handle in self.streams:
            handle.close()

    def __enter__(self) -> StreamRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
