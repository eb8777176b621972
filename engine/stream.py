"""`StreamEngine`: one stream's state and the stream-batch denoising step (DESIGN.md §2)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

import torch

from . import guidance
from .conditioning import PromptEncoder, mix_prompt_states
from .config import REPREPARE_PARAMS, StreamConfig, check_compatible, live_params
from .control.residuals import ControlFrames, ControlRows
from .controlnet import ResidualReuse, with_control
from .fade import Fade
from .loading import Engine
from .noise import mix_noise, weighted_seed_noise
from .prompt import Conditioning, PromptState
from .schedule import SlotSchedule, add_noise, predict_x0, slot_schedule
from .similarity import SimilarityFilter
from .skip import SkipPolicy, SlotFrame, make_skip_policy, update_skip_policy
from .temporal import Motion, TemporalFilter

logger = logging.getLogger(__name__)

LayoutKey = tuple[str, int]


@dataclass
class StepResult:
    """One call's output: images in [0, 1] shaped like the input, and whether the filter skipped it."""

    images: torch.Tensor
    skipped: bool


@dataclass
class UnetCall:
    """One stream-batch UNet call: the slots' noisy latents and the UNet's inputs built from them."""

    x_t: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    conditioning: Conditioning
    #: With a ControlNet: each slot's control image and embedding (ordered like `x_t`) and the UNet rows made of them.
    control_slots: ControlFrames | None = None
    control: ControlRows | None = None


@dataclass
class _StreamState:
    """Mutable per-stream tensors; replaced as a whole on re-prepare."""

    schedule: SlotSchedule
    fixed_noise: torch.Tensor
    stock_noise: torch.Tensor | None
    buffer: torch.Tensor | None = None
    #: A frame was let through on this state, so a later skipped frame has an output to repeat.
    has_frames: bool = False
    last_output: torch.Tensor | None = None
    #: With a ControlNet: the control images (and embeddings) of the buffer's slots, shifted with the latents.
    control_buffer: ControlFrames | None = None


@dataclass
class FrameWork:
    """A frame on its way through `StreamEngine.begin` → `advance` → `finish`, which may run on three threads.

    The input image is not kept: at large sizes it would hold memory for the frame's whole way.
    `state` is the stream state the frame advanced (set by `advance`; for a skipped frame, by `begin`: the
    state whose last output it repeats). `latents` are the VAE latents, `denoised` the x̂0 latents to decode.
    """

    skipped: bool
    single: bool
    state: _StreamState | None = None
    latents: torch.Tensor | None = None
    denoised: torch.Tensor | None = None
    output: torch.Tensor | None = None
    #: `temporal="flow"`: this frame's input motion (`begin`), then that of the frame it outputs (`advance`).
    motion: Motion | None = None
    #: With a ControlNet: this frame's control images (`begin`), then those of the frame it outputs (`advance`).
    control: ControlFrames | None = None

    def result(self) -> StepResult:
        """The frame's `StepResult`, one image for a single-image input."""
        return StepResult(images=self.output[0] if self.single else self.output, skipped=self.skipped)


def _bank_graph_size(config: StreamConfig) -> int:
    """The attention bank size of `config`'s compiled UNet graphs (0: a graph without a bank)."""
    return config.temporal_settings.bank_size if config.temporal == "bank" else 0


class StreamEngine:
    """A single video stream through a shared, loaded `Engine`.

    Many streams share one `Engine` and never change it: every tensor that depends on the stream (latent
    buffer, fixed noise, stock noise, prompt cache, similarity filter, skip caches) lives here.

    Args:
        engine (`Engine`): the shared models and their runner (`Engine.load` / `Engine.prepare`).
        config (`StreamConfig`): the stream's parameters; its prompt is prepared at once.

    Raises:
        ValueError: `config` cannot run on `engine` (see `engine.config.check_compatible`).
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
        self._prompt = self._encode_prompt(config)
        # Running transitions (`prompt_transition_frames`, `seed_transition_frames`), stepped once per frame.
        self._prompt_fade: Fade[PromptState] | None = None
        self._noise_fade: Fade[torch.Tensor] | None = None
        self._state = self._new_state(config)
        # Per-stream feature caches of the optional skip policy (None when `skip_policy="off"`).
        self.skip_policy: SkipPolicy | None = make_skip_policy(self.models, config, self.runner)
        self._check_temporal(config, self.runner)
        self.temporal = TemporalFilter(config, self.device, self.dtype)
        self.control_source = engine.control_source
        self._check_controlnet(self.runner)
        self._control_reuse = ResidualReuse()

    # ------------------------------------------------------------------ preparation

    def _check_temporal(self, config: StreamConfig, runner) -> None:
        """Refuse what a temporal mechanism cannot run with, at once rather than on the first frame."""
        if config.temporal == "off":
            return
        if not config.stream_batch or config.frame_buffer_size != 1:
            raise ValueError(f"`temporal={config.temporal!r}` works on the stream batch of one frame per call: "
                             "it needs `stream_batch=True` and `frame_buffer_size=1`")
        if config.temporal == "bank":
            from .backends.base import runner_name
            from .backends.split import unet_runner_of

            unet_runner = unet_runner_of(runner)
            if not unet_runner.capabilities.attention_bank:
                raise ValueError("`temporal='bank'` extends the UNet's self-attention per stream: it needs a UNet "
                                 "backend that takes the bank, eager, onnxruntime or tensorrt (this engine's is "
                                 f"{runner_name(unet_runner)}); use `temporal='flow'` on the others")
            if config.skip_policy != "off":
                raise ValueError("`temporal='bank'` and a skip policy both reuse attention across frames: use one")

    def _prepare_graphs(self, runner, config: StreamConfig) -> None:
        """A compiled backend opens the graphs of `config` now, on the caller's thread, rather than on a frame: a
        hot change to or from `temporal='bank'`, or of its `bank_size`, needs another UNet graph (the eager UNet
        has nothing to open)."""
        runner.prepare(config, self.kv_cache)

    def _check_controlnet(self, runner) -> None:
        from .backends.base import runner_name
        from .backends.split import unet_runner_of

        unet_runner = unet_runner_of(runner)
        if self.models.controlnet is not None and not unet_runner.capabilities.controlnet:
            raise ValueError(f"this engine has a ControlNet, but its UNet backend ({runner_name(unet_runner)}) cannot "
                             "run one: use `backend='eager'`, 'onnxruntime' or 'tensorrt'")

    def latent_shape(self, config: StreamConfig) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at `config`'s size."""
        factor = self.models.vae_scale_factor
        return (self.models.unet.config.in_channels, config.height // factor, config.width // factor)

    def _layouts(self, config: StreamConfig) -> list[LayoutKey]:
        f, n = config.frame_buffer_size, config.denoising_steps
        if config.stream_batch:
            return [(config.cfg_type, n * f)]
        layouts = [(config.cfg_type, f)]
        if config.cfg_type == "initialize":
            layouts.append(("self", f))
        return layouts

    def _encode_prompt(self, config: StreamConfig) -> PromptState:
        return self._prompts.state(config, self._layouts(config))

    def _new_noise(self, config: StreamConfig) -> torch.Tensor:
        rows = config.denoising_steps * config.frame_buffer_size
        noise = weighted_seed_noise(config.weighted_seeds, (rows, *self.latent_shape(config)))
        return noise.to(device=self.device, dtype=self.dtype)

    def _new_state(self, config: StreamConfig) -> _StreamState:
        schedule = slot_schedule(self.models.scheduler, config.num_inference_steps, config.t_index_list,
                                 config.frame_buffer_size, self.device, self.dtype)
        noise = self._new_noise(config)
        stock = noise.clone() if guidance.uses_stock_noise(config.cfg_type) else None
        return _StreamState(schedule=schedule, fixed_noise=noise, stock_noise=stock)

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
        runner = self.engine.runner(config) if reprepare else self.runner
        self._check_temporal(config, runner)
        if not reprepare and _bank_graph_size(config) != _bank_graph_size(self.config):
            self._prepare_graphs(runner, config)
        self._check_controlnet(runner)
        prompt_changed = any(getattr(config, name) != getattr(self.config, name)
                             for name in ("weighted_prompts", "negative_prompt", "prompt_blend"))
        prompt = self._encode_prompt(config) if prompt_changed or reprepare else self._prompt
        state = self._new_state(config) if reprepare else None
        noise_changed = config.weighted_seeds != self.config.weighted_seeds
        noise = self._new_noise(config) if noise_changed and not reprepare else None
        clear_skip_caches = prompt_changed or reprepare or noise_changed
        with self._lock, self._input_lock:
            self.skip_policy = update_skip_policy(self.skip_policy, self.models, self.config, config, runner,
                                                  clear_skip_caches)
            if clear_skip_caches:
                self._control_reuse.reset()
            if config.temporal != self.config.temporal:
                self.temporal = TemporalFilter(config, self.device, self.dtype)
            else:
                self.temporal.update(config)
                if clear_skip_caches:
                    self.temporal.reset()
            self.runner = runner
            self.config = config
            if prompt is not self._prompt:
                fade = prompt_changed and not reprepare and config.prompt_transition_frames > 0
                self._prompt_fade = Fade(self._prompt, prompt, config.prompt_transition_frames) if fade else None
                if not fade:
                    self._prompt = prompt
            self._filter.threshold = config.similarity_threshold
            self._filter.max_skip_frames = config.max_skip_frames
            if state is not None:
                self._state = state
                self._noise_fade = None
                self._filter.reset()
            elif noise is not None and config.seed_transition_frames > 0:
                # The stock noise is not reset: it follows the fixed noise frame by frame (`next_stock_noise`).
                self._noise_fade = Fade(self._state.fixed_noise, noise, config.seed_transition_frames)
            elif noise is not None:
                self._noise_fade = None
                self._state.fixed_noise = noise
                if self._state.stock_noise is not None:
                    self._state.stock_noise = noise.clone()

    def reset(self) -> None:
        """Forget every frame seen: the next call primes the buffer again (a running fade ends at its target)."""
        with self._lock, self._input_lock:
            if self._prompt_fade is not None:
                self._prompt, self._prompt_fade = self._prompt_fade.target, None
            self._noise_fade = None
            self._state = self._new_state(self.config)
            self._filter.reset()
            self.temporal.reset()
            self._control_reuse.reset()
            if self.skip_policy is not None:
                self.skip_policy.reset()

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

    @property
    def lock(self) -> threading.Lock:
        """Held while a frame changes the stream state; parameter updates wait for it."""
        return self._lock

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
            if self.control_source is not None:
                # The condition embedding depends on the control image alone: once per frame, here, off the UNet's
                # thread, for every slot and guidance row the frame will take.
                control = self.control_source(frames, config).to(device=self.device, dtype=self.dtype)
                frame.control = ControlFrames(control, self.runner.control_embedding(control))
            frame.latents = self.runner.encode(batch)
        return frame

    @torch.no_grad()
    def advance(self, frame: FrameWork) -> FrameWork:
        """Stage 2: denoise the frame's latents through the stream batch; a skipped frame passes unchanged."""
        if frame.skipped:
            return frame
        with self._lock:
            if self.config.stream_batch:
                call = self.prepare_denoise(frame)
                self.complete_denoise(frame, call, self._run_unet(frame.state, call))
            else:
                self._bind(frame)
                frame.denoised = self._sequential_call(frame.state, frame.latents, frame.control)
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

    def prepare_denoise(self, frame: FrameWork) -> UnetCall:
        """Bind the frame to the current state, prime an empty buffer, and build the UNet inputs of its
        stream-batch call. Callers hold `lock` until `complete_denoise`."""
        self._bind(frame)
        if frame.state.buffer is None:
            self._prime(frame.state, frame.latents, frame.control)
            self.temporal.restart(self.config.denoising_steps)
        latents, frame.motion = self.temporal.enter(frame.latents, frame.motion)
        return self._stream_inputs(frame.state, self.config, latents, frame.control)

    def complete_denoise(self, frame: FrameWork, call: UnetCall, model_output: torch.Tensor) -> None:
        """Guide, predict x̂0, carry stock noise and shift the buffer; the oldest slot's x̂0 is the frame's."""
        frame.denoised = self._stream_finish(frame.state, self.config, call, model_output)
        if call.control_slots is not None:
            frame.control = call.control_slots[-self.config.frame_buffer_size:]

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
        self._step_fades(frame.state)

    def _step_fades(self, state: _StreamState) -> None:
        """One frame of each running prompt or seed fade: the frame about to run sees its next mix."""
        fade = self._prompt_fade
        if fade is not None:
            t = fade.advance()
            self._prompt = fade.target if fade.finished else mix_prompt_states(fade.source, fade.target, t)
            if fade.finished:
                self._prompt_fade = None
        fade = self._noise_fade
        if fade is not None:
            t = fade.advance()
            state.fixed_noise = fade.target if fade.finished else mix_noise(fade.source, fade.target, t)
            if fade.finished:
                self._noise_fade = None

    def _prime(self, state: _StreamState, latents: torch.Tensor, control: ControlFrames | None) -> None:
        """Fill the buffer from the first frame so no output ever comes from the empty buffer."""
        started = time.perf_counter()
        f, n = self.config.frame_buffer_size, self.config.denoising_steps
        state.buffer = torch.zeros(((n - 1) * f, *latents.shape[1:]), device=self.device, dtype=self.dtype)
        if control is not None:
            state.control_buffer = control.repeat(n - 1)
        for _ in range(n - 1):
            self._stream_call(state, latents, control)
        # Priming rows hold the empty buffer's garbage: no real frame may reuse residuals or features of them.
        self._control_reuse.reset()
        if self.skip_policy is not None:
            self.skip_policy.reset()
        self.priming_s += time.perf_counter() - started

    def _unet_eps(self, cfg_type: str, x_t: torch.Tensor, schedule: SlotSchedule, stock: torch.Tensor | None,
                  control: ControlFrames | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.config.frame_buffer_size
        unet_latents, unet_timesteps = guidance.expand_unet_inputs(cfg_type, x_t, schedule.timesteps, f)
        conditioning = self._prompt.layouts[(cfg_type, x_t.shape[0])]
        if control is not None:
            rows = ControlRows.for_call(cfg_type, control.embeddings, f, self.config.controlnet_scale)
            conditioning = with_control(self.runner, unet_latents, unet_timesteps, conditioning, rows)
        model_output = self.runner.unet(unet_latents, unet_timesteps, conditioning)
        return guidance.guide(cfg_type, model_output, stock, self.config.guidance_scale, self.config.delta, f)

    def _stream_inputs(self, state: _StreamState, config: StreamConfig, latents: torch.Tensor,
                       control: ControlFrames | None) -> UnetCall:
        schedule, noise, f = state.schedule, state.fixed_noise, config.frame_buffer_size
        newest = add_noise(latents, noise[:f], schedule.alpha[:f], schedule.beta[:f])
        x_t = torch.cat([newest, state.buffer])
        unet_latents, unet_timesteps = guidance.expand_unet_inputs(config.cfg_type, x_t, schedule.timesteps, f)
        conditioning = self._prompt.layouts[(config.cfg_type, x_t.shape[0])]
        if self.temporal.bank is not None:
            conditioning = dataclasses.replace(conditioning, temporal_bank=self.temporal.bank)
        call = UnetCall(x_t, unet_latents, unet_timesteps, conditioning)
        if control is not None:
            call.control_slots = ControlFrames.cat([control, state.control_buffer])
            call.control = ControlRows.for_call(config.cfg_type, call.control_slots.embeddings, f,
                                                config.controlnet_scale)
        return call

    def _stream_finish(self, state: _StreamState, config: StreamConfig, call: UnetCall,
                       model_output: torch.Tensor) -> torch.Tensor:
        schedule, noise, f = state.schedule, state.fixed_noise, config.frame_buffer_size
        eps, stock = guidance.guide(config.cfg_type, model_output, state.stock_noise, config.guidance_scale,
                                    config.delta, f)
        x0 = predict_x0(call.x_t, eps, schedule)
        self.temporal.after_call(x0, f)
        if stock is not None:
            state.stock_noise = guidance.next_stock_noise(eps, stock, noise, schedule)
        state.buffer = add_noise(x0[:-f], noise[f:], schedule.alpha[f:], schedule.beta[f:])
        if call.control_slots is not None:
            state.control_buffer = call.control_slots[:-f]
        return x0[-f:]

    def _stream_call(self, state: _StreamState, latents: torch.Tensor, control: ControlFrames | None) -> torch.Tensor:
        """One UNet call over every slot; returns the oldest slot's x̂0 (`frame_buffer_size` rows)."""
        call = self._stream_inputs(state, self.config, latents, control)
        return self._stream_finish(state, self.config, call, self._run_unet(state, call))

    def _run_unet(self, state: _StreamState, call: UnetCall) -> torch.Tensor:
        conditioning = self._control_conditioning(call)
        if self.skip_policy is not None:
            return self.skip_policy.unet(call.latents, call.timesteps, conditioning,
                                         SlotFrame(call.x_t, state.schedule, state.fixed_noise))
        return self.runner.unet(call.latents, call.timesteps, conditioning)

    def _control_conditioning(self, call: UnetCall) -> Conditioning:
        """The call's conditioning with its ControlNet residuals, reused from an earlier frame when the stream's
        `controlnet_reuse_*` settings allow."""
        control = call.control
        if control is None or not control.active:
            return call.conditioning
        config = self.config
        newest = call.control_slots.images[:config.frame_buffer_size]
        residuals = self._control_reuse.lookup(newest, control.embeddings.shape[0], config.controlnet_reuse_interval,
                                               config.controlnet_reuse_threshold)
        if residuals is None:
            residuals = self.runner.controlnet(call.latents, call.timesteps, call.conditioning, control.embeddings)
            self._control_reuse.store(residuals, newest)
        return dataclasses.replace(call.conditioning, control=residuals.scaled(control.scale))

    def _sequential_call(self, state: _StreamState, latents: torch.Tensor,
                         control: ControlFrames | None = None) -> torch.Tensor:
        """The same steps one UNet call at a time, for one input (the stream batch's reference)."""
        cfg_type, n, f = self.config.cfg_type, self.config.denoising_steps, self.config.frame_buffer_size
        noise = state.fixed_noise
        stock = noise[:f] if guidance.uses_stock_noise(cfg_type) else None
        current = state.schedule.slots(0, 1)
        x_t = add_noise(latents, noise[:f], current.alpha, current.beta)
        for k in range(n):
            step_cfg = "self" if cfg_type == "initialize" and k > 0 else cfg_type
            eps, stock = self._unet_eps(step_cfg, x_t, current, stock, control)
            x0 = predict_x0(x_t, eps, current)
            if k == n - 1:
                break
            following = state.schedule.slots(k + 1, k + 2)
            next_noise = noise[(k + 1) * f:(k + 2) * f]
            if stock is not None:
                stock = guidance.carry_stock_noise(eps, stock, current, following, next_noise)
            x_t = add_noise(x0, next_noise, following.alpha, following.beta)
            current = following
        return x0
