"""Threaded runtime around the engine: decode → infer → encode, for many streams at once.

Threads run the engine's three stages as a pipeline, so the VAE calls of one frame overlap the
UNet call of another: two input threads (bytes → tensor → `StreamEngine.begin`: similarity filter, VAE
encode; each stream on one of them at a time, the stream that used them least recently first), the
inference thread (`advance`: the stream-batch UNet call, serving streams round-robin, up to
`max_batch` streams' frames per batched call, see `engine.batching`) and the output thread (`finish`:
VAE decode, then tensor → JPEG). Each stream holds at most
`max_in_flight` accepted frames that it has not yet taken back; past that, a new frame replaces the
oldest waiting one (latest wins) and the replaced frame is counted as dropped. Order is kept per
stream, and every frame carries its arrival time so latency is measured end to end.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .backends import NetworkRunner
from .batching import advance_batch, batch_key
from .codec import (
    DEFAULT_MAX_PIXELS,
    FrameError,
    ImageDecodeError,
    decode_image,
    encode_jpeg,
    rgb_to_tensor,
    tensor_to_rgb,
)
from .config import EngineConfig
from .flow import BatchPick, RecentUsage, admit_frame, least_used, round_robin_batch
from .models import ModelBundle
from .stream import FrameWork, StreamEngine

logger = logging.getLogger(__name__)

#: Input threads (decode + VAE encode). Two, so that one stream's expensive frames (a stream is decoded by
#: one input thread at a time) can never hold up every other stream's input.
INPUT_THREADS = 2
#: Threads that run models at the same time: the input threads (VAE encode), UNet, VAE decode.
MODEL_THREADS = INPUT_THREADS + 2


@dataclass
class FrameResult:
    """One answered frame: a JPEG, or an error for a frame that could not be used."""

    seq: int
    arrival: float
    jpeg: bytes | None = None
    error: FrameError | None = None
    skipped: bool = False
    inference_s: float = 0.0
    done: float = 0.0


@dataclass
class _Job:
    seq: int
    data: bytes
    arrival: float
    frame: FrameWork | None = None
    error: FrameError | None = None
    #: Model time spent on the frame so far (VAE encode, UNet, VAE decode), in seconds.
    model_s: float = 0.0

    @property
    def decoded(self) -> bool:
        return self.frame is not None or self.error is not None


@dataclass
class StreamStats:
    """Counters of one stream."""

    frames_in: int = 0
    frames_out: int = 0
    dropped: int = 0
    skipped: int = 0
    errors: int = 0


class StreamHandle:
    """A stream inside the runtime: its engine, its waiting frames and its finished outputs."""

    def __init__(self, engine: StreamEngine, max_in_flight: int, notify: Callable[[], None] | None):
        self.id = uuid.uuid4().hex[:12]
        self.engine = engine
        self.max_in_flight = max_in_flight
        self.stats = StreamStats()
        self.closed = False
        self._notify = notify
        self._waiting: deque[_Job] = deque()
        self._outputs: deque[FrameResult] = deque()
        self._unreleased = 0
        self._ready = threading.Condition()
        #: Recent input-stage time (decode + VAE encode) of this stream, for time-fair input scheduling.
        self.input_usage = RecentUsage()
        #: An input thread is working on one of this stream's frames (at most one at a time keeps their order).
        self.in_input_stage = False

    @property
    def in_flight(self) -> int:
        """Accepted frames not yet taken back with `get`."""
        return self._unreleased

    def get(self, timeout: float | None = None) -> FrameResult | None:
        """The next output in order, waiting up to `timeout` seconds; `None` on time-out."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._outputs or self.closed, timeout):
                return None
            return self._take()

    def get_nowait(self) -> FrameResult | None:
        """The next output if one is ready."""
        with self._ready:
            return self._take()

    def _take(self) -> FrameResult | None:
        if not self._outputs:
            return None
        self._unreleased -= 1
        return self._outputs.popleft()

    def _deliver(self, result: FrameResult) -> None:
        with self._ready:
            if self.closed:
                return
            self._outputs.append(result)
            self._ready.notify_all()
        if self._notify is not None:
            self._notify()


@dataclass
class RuntimeHealth:
    """What the runtime knows about its own state."""

    inference_errors: int = 0
    last_error: str | None = None
    frames_inferred: int = 0
    #: Network passes run (each advances one frame, or up to `max_batch` frames with batching).
    batches: int = 0
    inference_s: deque = field(default_factory=lambda: deque(maxlen=100))
    #: Runtime threads that stopped on an unexpected error, by name, with the error.
    dead_threads: dict[str, str] = field(default_factory=dict)


class StreamRuntime:
    """Streams sharing one model set and one inference thread.

    Args:
        models (`ModelBundle`): shared models on the configured device.
        config (`EngineConfig`): defaults for every stream; `open_stream` may override fields.
        runner (`NetworkRunner`, *optional*): backend shared by all streams.
        jpeg_quality (`int`): quality of output JPEGs.
        max_pixels (`int`): largest accepted input image, in pixels.
        max_batch (`int`, defaults to 1): most frames, each from a different stream, advanced by one
            batched network call; 1 serves one frame at a time.
        batch_wait_s (`float`, defaults to 0): how long a partial batch may wait for frames that are
            still in the input stage (decoding, VAE encode) of batch-compatible streams; the wait ends as
            soon as the batch is full or nothing more is coming, so a lone stream never waits.
    """

    def __init__(self, models: ModelBundle, config: EngineConfig, runner: NetworkRunner | None = None,
                 jpeg_quality: int = 85, max_pixels: int = DEFAULT_MAX_PIXELS, max_batch: int = 1,
                 batch_wait_s: float = 0.0):
        if max_batch < 1:
            raise ValueError(f"`max_batch` must be >= 1, got {max_batch}")
        if batch_wait_s < 0:
            raise ValueError(f"`batch_wait_s` must be >= 0, got {batch_wait_s}")
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.models = models
        self.config = config
        self.runner = runner
        self.jpeg_quality = jpeg_quality
        self.max_pixels = max_pixels
        self.health = RuntimeHealth()
        self._streams: list[StreamHandle] = []
        self._lock = threading.Condition()
        self._seq = itertools.count()
        self._last_served = -1
        self._last_decoded = -1
        self._encode_queue: queue.Queue = queue.Queue()
        self._stopping = False
        loops = [(f"stream-decode-{index}", self._decode_loop) for index in range(INPUT_THREADS)]
        loops += [("stream-inference", self._inference_loop), ("stream-encode", self._encode_loop)]
        self._threads = [threading.Thread(target=self._guarded, args=(loop,), name=name, daemon=True)
                         for name, loop in loops]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ streams

    @property
    def streams(self) -> list[StreamHandle]:
        with self._lock:
            return list(self._streams)

    def open_stream(self, max_in_flight: int = 2, notify: Callable[[], None] | None = None,
                    **overrides) -> StreamHandle:
        """A new stream with its own engine state (encodes its prompt: call off the event loop)."""
        if max_in_flight < 1:
            raise ValueError(f"`max_in_flight` must be >= 1, got {max_in_flight}")
        engine = StreamEngine(self.models, self.config.replace(**overrides), runner=self.runner)
        handle = StreamHandle(engine, max_in_flight, notify)
        with self._lock:
            self._streams.append(handle)
        return handle

    def close_stream(self, handle: StreamHandle) -> None:
        """Remove a stream; its waiting frames are discarded and `get` stops waiting."""
        with self._lock:
            if handle in self._streams:
                self._streams.remove(handle)
            handle._waiting.clear()
        with handle._ready:
            handle.closed = True
            handle._outputs.clear()
            handle._ready.notify_all()

    def submit(self, handle: StreamHandle, data: bytes, arrival: float | None = None) -> bool:
        """Queue an encoded frame; `False` if it was dropped at once (nothing waiting to replace)."""
        arrival = time.monotonic() if arrival is None else arrival
        with self._lock:
            if handle.closed:
                return False
            handle.stats.frames_in += 1
            decision = admit_frame(handle.in_flight, len(handle._waiting), handle.max_in_flight)
            if not decision.accept:
                handle.stats.dropped += 1
                return False
            if decision.replace_index is not None:
                del handle._waiting[decision.replace_index]
                handle.stats.dropped += 1
            else:
                with handle._ready:
                    handle._unreleased += 1
            handle._waiting.append(_Job(next(self._seq), data, arrival))
            self._lock.notify_all()
        return True

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
            self.health.dead_threads[name] = f"{type(error).__name__}: {error}"
            logger.critical("runtime thread %s stopped: every stream is stalled", name, exc_info=error)

    @property
    def failure(self) -> str | None:
        """Why the runtime cannot serve frames any more (a dead thread), or `None` while it can."""
        if self._stopping:
            return None
        dead = dict(self.health.dead_threads)
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
                handle.in_input_stage = True
                config = handle.engine.config
            started = time.perf_counter()
            self._input_stage(handle, job, config)
            with self._lock:
                handle.input_usage.add(time.perf_counter() - started, time.monotonic())
                handle.in_input_stage = False
                self._lock.notify_all()

    def _input_stage(self, handle: StreamHandle, job: _Job, config: EngineConfig) -> None:
        """Decode one frame and run the engine's first stage; any failure becomes that frame's error.

        `job.frame` or `job.error` is set last: the inference thread takes the job as soon as either is.
        """
        data, job.data = job.data, b""
        try:
            image = rgb_to_tensor(decode_image(data, config.width, config.height, self.max_pixels))
        except ImageDecodeError as error:
            job.error = error
            return
        except Exception as error:  # a decoder bug must cost this frame only, never the shared thread
            logger.warning("decoding a frame failed unexpectedly", exc_info=error)
            job.error = ImageDecodeError("bad_image", f"not a decodable image: {type(error).__name__}: {error}")
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
        self.health.inference_errors += 1
        self.health.last_error = f"{type(error).__name__}: {error}"
        return FrameError("inference_failed", f"inference failed: {error}")

    def _next_undecoded(self) -> tuple[StreamHandle, _Job] | None:
        now = time.monotonic()
        index = least_used(self._streams, self._last_decoded,
                           lambda h: not h.in_input_stage and any(not job.decoded for job in h._waiting),
                           lambda h: h.input_usage.at(now))
        if index is None:
            return None
        handle = self._streams[index]
        return handle, next(job for job in handle._waiting if not job.decoded)

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
                batch = [(self._streams[index], self._streams[index]._waiting.popleft()) for index in pick.indices]
            self._infer(batch)

    def _next_batch(self) -> BatchPick | None:
        return round_robin_batch(self._streams, self._last_served,
                                 lambda h: bool(h._waiting) and h._waiting[0].decoded,
                                 lambda h: batch_key(h.engine), self.max_batch)

    def _gather(self, pick: BatchPick) -> BatchPick | None:
        """Let a partial batch wait up to `batch_wait_s` for compatible frames still in the input stage.

        On a saturated machine a fuller batch costs less UNet time per frame; the wait stops at once when
        the batch fills or no compatible stream has a frame on its way. `None` if the streams changed
        so that nothing is ready any more. Called with `_lock` held.
        """
        deadline = time.monotonic() + self.batch_wait_s
        while not self._stopping and pick is not None and len(pick.indices) < self.max_batch \
                and self._frames_coming(pick) and (remaining := deadline - time.monotonic()) > 0:
            self._lock.wait(remaining)
            pick = self._next_batch()
        return pick

    def _frames_coming(self, pick: BatchPick) -> bool:
        """Whether a stream outside `pick`, batchable with its leader, has its next frame in the input stage."""
        key = batch_key(self._streams[pick.indices[0]].engine)
        if key is None:
            return False
        return any(index not in pick.indices and handle._waiting and not handle._waiting[0].decoded
                   and batch_key(handle.engine) == key for index, handle in enumerate(self._streams))

    def _infer(self, batch: list[tuple[StreamHandle, _Job]]) -> None:
        """Advance one frame per stream, in one batched UNet call when there are several."""
        ready = [(handle, job) for handle, job in batch if job.error is None]
        try:
            if ready:
                started = time.perf_counter()
                errors = advance_batch([handle.engine for handle, _ in ready], [job.frame for _, job in ready])
                elapsed = time.perf_counter() - started
                self.health.batches += 1
                for (_, job), error in zip(ready, errors, strict=True):
                    job.model_s += elapsed
                    if error is None:
                        self.health.frames_inferred += 1
                    else:
                        job.error = self._model_error("inference", error)
        except Exception as error:  # a bug outside the per-group handling still costs only these frames
            failure = self._model_error("inference", error)
            for _, job in ready:
                job.error = job.error or failure
        finally:
            for handle, job in batch:
                self._encode_queue.put((handle, job))

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
                    result.jpeg = encode_jpeg(tensor_to_rgb(step.images), self.jpeg_quality)
                except Exception as error:  # a failing frame must not kill the worker
                    result.error = self._model_error("VAE decode", error)
                else:
                    result.skipped = step.skipped
                    result.inference_s = job.model_s
                    self.health.inference_s.append(job.model_s)
            if result.error is None:
                handle.stats.frames_out += 1
                handle.stats.skipped += int(result.skipped)
            else:
                handle.stats.errors += 1
            result.done = time.monotonic()
            handle._deliver(result)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every thread and wait for them (frames still waiting are discarded)."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        self._encode_queue.put(None)
        for thread in self._threads:
            thread.join(timeout)
        for handle in self.streams:
            self.close_stream(handle)

    def __enter__(self) -> StreamRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
