"""`StreamEngine`: one stream's state and the stream-batch denoising step (DESIGN.md §2); its optional features
are parts (`engine.parts`)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .conditioning import PromptEncoder
from .config import REPREPARE_PARAMS, StreamConfig, check_compatible, live_params
from .control.residuals import ControlFrames
from .loading import Engine
from .parts import StreamPart
from .parts.control import ControlPart
from .parts.skip import SkipPart
from .parts.temporal import TemporalPart
from .parts.transitions import Transitions
from .prompt import Conditioning, PromptState
from .sequential import sequential_denoise
from .similarity import SimilarityFilter
from .skip import SkipPolicy, SlotFrame
from .stream_batch import stream_finish, stream_inputs
from .stream_state import FrameWork, StepResult, StreamState, latent_shape, new_noise, new_state, prompt_layouts
from .temporal import TemporalFilter
from .unet_call import UnetCall, run_calls

logger = logging.getLogger(__name__)

LayoutKey = tuple[str, int]


class StreamEngine:
    """A single video stream through a shared, loaded `Engine`.

    Many streams share one `Engine` and never change it: every tensor that depends on the stream (latent
    buffer, fixed noise, stock noise, prompt cache, similarity filter) lives here, and each optional feature in
    its part (`engine.parts`: skip policy, temporal steadiness, ControlNet, transitions), which the stream
    calls at the same points whatever the feature.

    Args:
        engine (`Engine`): the shared models and their runner (`Engine.load` / `Engine.prepare`).
        config (`StreamConfig`): the stream's parameters; its prompt is prepared at once.

    Raises:
        ValueError: `config` cannot run on `engine` (see `engine.config.check_compatible`), or a part refuses it.
    """

    def __init__(self, engine: Engine, config: StreamConfig):
        check_compatible(engine.config, config)
        self.engine = engine
        self.models = engine.models
        self.runner = engine.runner(config)
        self.device = engine.device
        self.dtype = engine.dtype
        self.kv_cache = engine.config.kv_cache
        self._lock = threading.Lock()
        # `begin` takes only this one, so a stream's next frame can pass the filter while `advance` holds
        # `_lock` for the UNet call; updates take `_lock`, then this.
        self._input_lock = threading.Lock()
        self.config = config
        self.frames_processed = 0
        self.frames_skipped = 0
        #: Seconds spent priming the buffer (at the first frame, after re-prepares and resets), so the runtime can
        #: charge them to this stream when it shares the UNet by time.
        self.priming_s = 0.0
        self._filter = SimilarityFilter(config.similarity_threshold, config.max_skip_frames, seed=config.seed)
        self._prompts = PromptEncoder(self.models, self.kv_cache)
        self._state = self._new_state(config)
        self.skip = SkipPart(self.models, config, self.runner)
        self.temporal_part = TemporalPart(config, self.device, self.dtype, self.runner)
        self.control = ControlPart(self.models.controlnet is not None, engine.control_source, self.runner)
        self.transitions = Transitions(self._encode_prompt(config))
        self.parts: tuple[StreamPart, ...] = (self.skip, self.temporal_part, self.control, self.transitions)

    @property
    def skip_policy(self) -> SkipPolicy | None:
        """The stream's skip policy (None with `skip_policy="off"`)."""
        return self.skip.policy

    @property
    def temporal(self) -> TemporalFilter:
        """The stream's temporal-steadiness filter."""
        return self.temporal_part.filter

    @property
    def _prompt(self) -> PromptState:
        """The prompt conditioning the next frame sees (mid-fade: the current mix)."""
        return self.transitions.prompt

    def conditioning(self, cfg_type: str, rows: int) -> Conditioning:
        """The prompt conditioning of a UNet call of `rows` slot rows in guidance mode `cfg_type`."""
        return self._prompt.layouts[(cfg_type, rows)]

    # ------------------------------------------------------------------ preparation

    def latent_shape(self, config: StreamConfig) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at `config`'s size."""
        return latent_shape(self.models, config)

    def _encode_prompt(self, config: StreamConfig) -> PromptState:
        return self._prompts.state(config, prompt_layouts(config))

    def _new_state(self, config: StreamConfig) -> StreamState:
        return new_state(self.models, config, self.device, self.dtype)

    # ------------------------------------------------------------------ hot updates

    @property
    def prompt(self) -> str:
        return self._prompt.prompt

    def update_prompt(self, prompt: str, negative_prompt: str | None = None) -> None:
        """Swap the prompt between two frames; encoding runs on the caller's thread."""
        self.update_params(prompt=prompt, **({} if negative_prompt is None else {"negative_prompt": negative_prompt}))

    def update_params(self, **params) -> None:
        """Change parameters between two frames, all at once or not at all.

        Hot parameters (`HOT_PARAMS`) keep the stream going; `t_index_list`, `width` and `height`
        re-prepare it (new schedule, noise and buffer, primed again). Anything else raises `ValueError`.
        A prompt or seed change fades in over `prompt_transition_frames` / `seed_transition_frames` frames
        when those are set (a re-prepare switches at once).
        """
        config = self.config.updated(**params)  # validates, names load-time settings as such
        fixed = set(params) - live_params()
        if fixed:
            raise ValueError(f"{sorted(fixed)} are fixed when the stream opens; a live stream may change "
                             f"{sorted(live_params())}")
        check_compatible(self.engine.config, config)
        reprepare = any(getattr(config, name) != getattr(self.config, name) for name in REPREPARE_PARAMS)
        # Every check, and whatever is slow (graphs to open, a prompt to encode), before anything changes.
        # A re-prepare's runner comes with the graphs of `config` opened; a hot change may need another graph too
        # (a new attention bank size), opened here rather than on a frame.
        runner = self.engine.runner(config) if reprepare else self.runner
        for part in self.parts:
            part.check(config, runner)
        if not reprepare:
            runner.prepare(config, self.kv_cache)
        prompt_changed = any(getattr(config, name) != getattr(self.config, name)
                             for name in ("weighted_prompts", "negative_prompt", "prompt_blend"))
        prompt = self._encode_prompt(config) if prompt_changed or reprepare else None
        state = self._new_state(config) if reprepare else None
        noise_changed = config.weighted_seeds != self.config.weighted_seeds
        noise = new_noise(self.models, config, self.device, self.dtype) if noise_changed and not reprepare else None
        with self._lock, self._input_lock:
            for part in self.parts:
                part.update(self.config, config, runner, fresh=prompt_changed or reprepare or noise_changed)
            self.runner = runner
            self.config = config
            if prompt is not None:
                fade = prompt_changed and not reprepare
                self.transitions.fade_prompt(prompt, config.prompt_transition_frames if fade else 0)
            self._filter.threshold = config.similarity_threshold
            self._filter.max_skip_frames = config.max_skip_frames
            if state is not None:
                self._state = state
                self.transitions.stop_noise()
                self._filter.reset()
            elif noise is not None and config.seed_transition_frames > 0:
                # The stock noise is not reset: it follows the fixed noise frame by frame (`next_stock_noise`).
                self.transitions.fade_noise(self._state.fixed_noise, noise, config.seed_transition_frames)
            elif noise is not None:
                self.transitions.stop_noise()
                self._state.fixed_noise = noise
                if self._state.stock_noise is not None:
                    self._state.stock_noise = noise.clone()

    def reset(self) -> None:
        """Forget every frame seen: the next call primes the buffer again (a running fade ends at its target)."""
        with self._lock, self._input_lock:
            self._state = self._new_state(self.config)
            self._filter.reset()
            for part in self.parts:
                part.reset()

    # ------------------------------------------------------------------ per frame

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], `[3, H, W]` or `[frame_buffer_size, 3, H, W]`, to the stream's output."""
        return self.step(images).images

    def step(self, images: torch.Tensor) -> StepResult:
        """Advance the stream by one input (`frame_buffer_size` frames) and return one output."""
        return self.finish(self.advance(self.begin(images)))

    # ------------------------------------------------------------------ stages
    # `step` is three stages. `engine.runtime` runs them on separate threads (input, inference, output) so
    # that the VAE calls of one frame overlap the UNet call of another; each stage takes the frames of a
    # stream in order. `engine.batching` runs `advance` for many engines with one UNet call.

    def check_input(self, images: torch.Tensor) -> torch.Tensor:
        """`images` as `[frame_buffer_size, 3, H, W]`; `ValueError` when the shape does not fit the config."""
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        f = self.config.frame_buffer_size
        if batch.shape[0] != f or tuple(batch.shape[-2:]) != (self.config.height, self.config.width):
            raise ValueError(f"expected {f} frame(s) of 3x{self.config.height}x{self.config.width}, "
                             f"got {tuple(images.shape)}")
        return batch

    @torch.no_grad()
    def begin(self, images: torch.Tensor) -> FrameWork:
        """Stage 1: check the input, ask the similarity filter, VAE-encode a frame it lets through."""
        frames = self.check_input(images).to(device=self.device, dtype=self.dtype)
        # Cosine similarity on [-1, 1] images: on [0, 1] every pair of frames looks alike.
        batch = frames * 2 - 1
        with self._input_lock:
            state, config = self._state, self.config
            skipped = bool(config.similarity_filter and self._filter.should_skip(batch) and state.has_frames)
            state.has_frames = state.has_frames or not skipped
        frame = FrameWork(skipped=skipped, single=images.dim() == 3, state=state if skipped else None)
        if not skipped:
            frame.motion = self.temporal.observe_input(batch)
            frame.control = self.control.frames(frames, config, self.runner, self.device, self.dtype)
            frame.latents = self.runner.encode(batch)
        return frame

    @torch.no_grad()
    def advance(self, frame: FrameWork) -> FrameWork:
        """Stage 2: denoise the frame's latents through the stream batch; a skipped frame passes unchanged."""
        if frame.skipped:
            return frame
        with self.denoising() as denoising:
            if self.config.stream_batch:
                call = denoising.prepare(frame)
                denoising.complete(frame, call, self._run_unet(frame.state, call))
            else:
                self._bind(frame)
                frame.denoised = sequential_denoise(self, frame.state, frame.latents, frame.control)
        return frame

    @torch.no_grad()
    def finish(self, frame: FrameWork) -> StepResult:
        """Stage 3: VAE-decode the frame's x̂0 latents; a skipped frame repeats the stream's last output.

        Raises `ValueError` for a skipped frame whose stream has no output to repeat (the frame it would
        repeat failed, or the stream was reset in between).
        """
        if frame.skipped:
            if frame.state.last_output is None:
                raise ValueError("the similarity filter skipped a frame, but there is no earlier output to repeat")
            frame.output = frame.state.last_output
            self.frames_skipped += 1
        else:
            output = (self.runner.decode(frame.denoised) / 2 + 0.5).clamp(0, 1)
            if self.config.show_control and frame.control is not None:
                frame.output = frame.control.images
            else:
                frame.output = self.temporal.blend_output(output, frame.motion)
            frame.state.last_output = frame.output
            self.frames_processed += 1
        return frame.result()

    @contextmanager
    def denoising(self) -> Iterator[Denoising]:
        """The stream held for one stream-batch UNet call (its own, or a share of a batched one): inside,
        `prepare` a frame's call and `complete` it with the UNet's output; parameter updates wait meanwhile."""
        with self._lock:
            yield Denoising(self)

    @property
    def needs_repriming(self) -> bool:
        """Whether the next frame primes the buffer again first (n - 1 extra UNet calls after a re-prepare or a
        reset; a new stream's first priming is part of opening it)."""
        return self.config.stream_batch and self._state.buffer is None and self.frames_processed > 0

    def fits(self, frame: FrameWork) -> bool:
        """Whether the frame's latents fit the stream's current size (not if it changed since `begin`)."""
        return tuple(frame.latents.shape) == (self.config.frame_buffer_size, *self.latent_shape(self.config))

    def _bind(self, frame: FrameWork) -> None:
        """Advance the current state; a frame encoded before a size change cannot."""
        if not self.fits(frame):
            raise ValueError(f"the frame was encoded as latents {tuple(frame.latents.shape)}, but the stream is now "
                             f"{self.config.width}x{self.config.height} (its size changed in between)")
        frame.state = self._state
        self.transitions.step(frame.state)

    def _prime(self, state: StreamState, latents: torch.Tensor, control: ControlFrames | None) -> None:
        """Fill the buffer from the first frame so no output ever comes from the empty buffer."""
        started = time.perf_counter()
        f, n = self.config.frame_buffer_size, self.config.denoising_steps
        state.buffer = torch.zeros(((n - 1) * f, *latents.shape[1:]), device=self.device, dtype=self.dtype)
        if control is not None:
            state.control_buffer = control.repeat(n - 1)
        for _ in range(n - 1):
            self._stream_call(state, latents, control)
        for part in self.parts:
            part.primed(self.config)
        self.priming_s += time.perf_counter() - started

    def _stream_call(self, state: StreamState, latents: torch.Tensor, control: ControlFrames | None) -> torch.Tensor:
        """One UNet call over every slot; returns the oldest slot's x̂0 (`frame_buffer_size` rows)."""
        call = stream_inputs(state, self.config, latents, control, self.conditioning, self.temporal)
        return stream_finish(state, self.config, call, self._run_unet(state, call), self.temporal)

    def _run_unet(self, state: StreamState, call: UnetCall) -> torch.Tensor:
        """The model output of this stream's own call: its ControlNet residuals (reused when allowed) and its
        skip policy's piecewise UNet, if any."""
        resolved = dataclasses.replace(call, conditioning=self.control.conditioning(call, self.config, self.runner),
                                       control=None)
        policy = self.skip_policy
        unet = None if policy is None else lambda latents, timesteps, conditioning: policy.unet(
            latents, timesteps, conditioning, SlotFrame(call.x_t, state.schedule, state.fixed_noise))
        return run_calls(self.runner, [resolved], unet)[0]


class Denoising:
    """A stream held for one UNet call (`StreamEngine.denoising`): prepare a frame's call, complete it."""

    def __init__(self, stream: StreamEngine):
        self.stream = stream

    def prepare(self, frame: FrameWork) -> UnetCall:
        """Bind the frame to the current state, prime an empty buffer, and build the UNet inputs of its
        stream-batch call."""
        stream = self.stream
        stream._bind(frame)
        if frame.state.buffer is None:
            stream._prime(frame.state, frame.latents, frame.control)
        latents, frame.motion = stream.temporal.enter(frame.latents, frame.motion)
        return stream_inputs(frame.state, stream.config, latents, frame.control, stream.conditioning, stream.temporal)

    def complete(self, frame: FrameWork, call: UnetCall, model_output: torch.Tensor) -> None:
        """Guide, predict x̂0, carry stock noise and shift the buffer; the oldest slot's x̂0 is the frame's."""
        stream = self.stream
        frame.denoised = stream_finish(frame.state, stream.config, call, model_output, stream.temporal)
        if call.control_slots is not None:
            frame.control = call.control_slots[-stream.config.frame_buffer_size:]
