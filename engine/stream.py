"""`StreamEngine`: one stream's state and the stream-batch denoising step (DESIGN.md §2)."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from . import guidance
from .backends import NetworkRunner, make_runner
from .config import HOT_PARAMS, REPREPARE_PARAMS, EngineConfig
from .memory import apply_memory_mode
from .models import ModelBundle
from .prompt import Conditioning, PromptState, encode_prompt, install_kv_processors, precompute_kv
from .schedule import SlotSchedule, add_noise, predict_x0, slot_schedule
from .similarity import SimilarityFilter
from .skip import SkipPolicy, SlotFrame, make_skip_policy, update_skip_policy

logger = logging.getLogger(__name__)

LayoutKey = tuple[str, int]


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is fp16 on CUDA and fp32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


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


@dataclass
class _StreamState:
    """Mutable per-stream tensors; replaced as a whole on re-prepare."""

    schedule: SlotSchedule
    fixed_noise: torch.Tensor
    stock_noise: torch.Tensor | None
    buffer: torch.Tensor | None = None
    last_output: torch.Tensor | None = None


@dataclass
class FrameWork:
    """A frame between `StreamEngine.begin_frame` and `finish_frame`: the input in [-1, 1], the state and
    config it advances (fixed when it began), and its output once known."""

    images: torch.Tensor
    state: _StreamState
    config: EngineConfig
    skipped: bool
    output: torch.Tensor | None = None

    def result(self, single: bool) -> StepResult:
        """The frame's `StepResult`, one image for a single-image input."""
        return StepResult(images=self.output[0] if single else self.output, skipped=self.skipped)


class StreamEngine:
    """A single video stream through a shared model set.

    Many engines may share one `ModelBundle`: every tensor that depends on the stream (latent
    buffer, fixed noise, stock noise, prompt cache, similarity filter) lives here.

    Args:
        models (`ModelBundle`): the shared models, already on the config's device and dtype.
        config (`EngineConfig`): the stream's configuration; its prompt is prepared at once.
        runner (`NetworkRunner`, *optional*): how to run the networks; by default the shared runner of
            `config.backend` (`engine.backends.make_runner`).
    """

    def __init__(self, models: ModelBundle, config: EngineConfig, runner: NetworkRunner | None = None):
        self.models = models
        self.runner = runner if runner is not None else make_runner(models, config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if config.use_kv_cache:
            install_kv_processors(models.unet)
        apply_memory_mode(models, config.memory)
        self._lock = threading.Lock()
        self.config = config
        self.frames_processed = 0
        self.frames_skipped = 0
        self._filter = SimilarityFilter(config.similarity_threshold, config.max_skip_frames, seed=config.seed)
        self._prompt = self._encode_prompt(config, config.prompt, config.negative_prompt)
        self._state = self._new_state(config)
        # Per-stream feature caches of the optional skip policy (None when `skip_policy="off"`).
        self.skip_policy: SkipPolicy | None = make_skip_policy(models, config, self.runner)

    # ------------------------------------------------------------------ preparation

    def latent_shape(self, config: EngineConfig) -> tuple[int, int, int]:
        """(channels, height, width) of one latent at `config`'s size."""
        factor = self.models.vae_scale_factor
        return (self.models.unet.config.in_channels, config.height // factor, config.width // factor)

    def _layouts(self, config: EngineConfig) -> list[LayoutKey]:
        f, n = config.frame_buffer_size, config.denoising_steps
        if config.stream_batch:
            return [(config.cfg_type, n * f)]
        layouts = [(config.cfg_type, f)]
        if config.cfg_type == "initialize":
            layouts.append(("self", f))
        return layouts

    def _encode_prompt(self, config: EngineConfig, prompt: str, negative_prompt: str) -> PromptState:
        tokenizer, text_encoder = self.models.tokenizer, self.models.text_encoder
        cond = encode_prompt(tokenizer, text_encoder, prompt)
        uncond = encode_prompt(tokenizer, text_encoder, negative_prompt) \
            if guidance.needs_negative_prompt(config.cfg_type) else cond
        layouts = {}
        for cfg_type, rows in self._layouts(config):
            states = guidance.expand_prompt_embeds(cfg_type, cond, uncond, rows, config.frame_buffer_size)
            kv = precompute_kv(self.models.unet, states) if config.use_kv_cache else None
            layouts[(cfg_type, rows)] = Conditioning(states, kv)
        return PromptState(prompt, negative_prompt, layouts)

    def _new_noise(self, config: EngineConfig) -> torch.Tensor:
        rows = config.denoising_steps * config.frame_buffer_size
        generator = torch.Generator().manual_seed(config.seed)
        noise = torch.randn((rows, *self.latent_shape(config)), generator=generator)
        return noise.to(device=self.device, dtype=self.dtype)

    def _new_state(self, config: EngineConfig) -> _StreamState:
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
        """
        unknown = set(params) - HOT_PARAMS - REPREPARE_PARAMS
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)} on a live stream; allowed: "
                             f"{sorted(HOT_PARAMS | REPREPARE_PARAMS)}")
        config = self.config.replace(**params)  # validates
        reprepare = any(getattr(config, name) != getattr(self.config, name) for name in REPREPARE_PARAMS)
        prompt_changed = (config.prompt, config.negative_prompt) != (self.config.prompt, self.config.negative_prompt)
        prompt = self._encode_prompt(config, config.prompt, config.negative_prompt) \
            if prompt_changed or reprepare else self._prompt
        state = self._new_state(config) if reprepare else None
        noise = self._new_noise(config) if config.seed != self.config.seed and not reprepare else None
        clear_skip_caches = prompt_changed or reprepare or config.seed != self.config.seed
        with self._lock:
            self.skip_policy = update_skip_policy(self.skip_policy, self.models, self.config, config, self.runner,
                                                  clear_skip_caches)
            self.config = config
            self._prompt = prompt
            self._filter.threshold = config.similarity_threshold
            self._filter.max_skip_frames = config.max_skip_frames
            if state is not None:
                self._state = state
                self._filter.reset()
            elif noise is not None:
                self._state.fixed_noise = noise
                if self._state.stock_noise is not None:
                    self._state.stock_noise = noise.clone()

    def reset(self) -> None:
        """Forget every frame seen: the next call primes the buffer again."""
        with self._lock:
            self._state = self._new_state(self.config)
            self._filter.reset()
            if self.skip_policy is not None:
                self.skip_policy.reset()

    # ------------------------------------------------------------------ per frame

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], `[3, H, W]` or `[frame_buffer_size, 3, H, W]`, to the stream's output."""
        return self.step(images).images

    @torch.no_grad()
    def step(self, images: torch.Tensor) -> StepResult:
        """Advance the stream by one input (`frame_buffer_size` frames) and return one output."""
        batch = self.check_input(images)
        with self._lock:
            frame = self.begin_frame(batch)
            if not frame.skipped:
                latents = self.runner.encode(frame.images)
                if frame.config.stream_batch:
                    self.prime_if_empty(frame, latents)
                    denoised = self._stream_call(frame.state, latents)
                else:
                    denoised = self._sequential_call(frame.state, latents)
                self.finish_frame(frame, self.runner.decode(denoised))
        return frame.result(single=images.dim() == 3)

    # ------------------------------------------------------------------ step phases
    # `step` is these phases in order; `engine.batching` runs them for many engines with one network
    # call per phase. Callers hold `lock` from `begin_frame` to `finish_frame`.

    @property
    def lock(self) -> threading.Lock:
        """Held while a frame advances the stream; parameter updates wait for it."""
        return self._lock

    def check_input(self, images: torch.Tensor) -> torch.Tensor:
        """`images` as `[frame_buffer_size, 3, H, W]`; `ValueError` when the shape does not fit the config."""
        batch = images.unsqueeze(0) if images.dim() == 3 else images
        f = self.config.frame_buffer_size
        if batch.shape[0] != f or tuple(batch.shape[-2:]) != (self.config.height, self.config.width):
            raise ValueError(f"expected {f} frame(s) of 3x{self.config.height}x{self.config.width}, "
                             f"got {tuple(images.shape)}")
        return batch

    def begin_frame(self, batch: torch.Tensor) -> FrameWork:
        """Scale the input to [-1, 1] and ask the similarity filter; a skipped frame is already finished."""
        state, config = self._state, self.config
        # Cosine similarity on [-1, 1] images: on [0, 1] every pair of frames looks alike.
        batch = batch.to(device=self.device, dtype=self.dtype) * 2 - 1
        skipped = bool(config.similarity_filter and self._filter.should_skip(batch)
                       and state.last_output is not None)
        frame = FrameWork(images=batch, state=state, config=config, skipped=skipped)
        if skipped:
            self.frames_skipped += 1
            frame.output = state.last_output
        return frame

    def prime_if_empty(self, frame: FrameWork, latents: torch.Tensor) -> None:
        """Fill an empty buffer from the frame's latents (the stream's first frame)."""
        if frame.state.buffer is None:
            self._prime(frame.state, latents)

    def stream_unet_call(self, frame: FrameWork, latents: torch.Tensor) -> UnetCall:
        """The UNet inputs of one stream-batch call for the frame's encoded latents."""
        return self._stream_inputs(frame.state, frame.config, latents)

    def finish_stream_call(self, frame: FrameWork, call: UnetCall, model_output: torch.Tensor) -> torch.Tensor:
        """Guide, predict x̂0, carry stock noise and shift the buffer; returns the oldest slot's x̂0."""
        return self._stream_finish(frame.state, frame.config, call, model_output)

    def finish_frame(self, frame: FrameWork, decoded: torch.Tensor) -> None:
        """Record the decoded images (in [-1, 1]) as the frame's output and the stream's last output."""
        frame.output = (decoded / 2 + 0.5).clamp(0, 1)
        frame.state.last_output = frame.output
        self.frames_processed += 1

    def _prime(self, state: _StreamState, latents: torch.Tensor) -> None:
        """Fill the buffer from the first frame so no output ever comes from the empty buffer."""
        f, n = self.config.frame_buffer_size, self.config.denoising_steps
        state.buffer = torch.zeros(((n - 1) * f, *latents.shape[1:]), device=self.device, dtype=self.dtype)
        for _ in range(n - 1):
            self._stream_call(state, latents)
        if self.skip_policy is not None:
            # Priming rows hold the empty buffer's garbage: no real frame may reuse features of them.
            self.skip_policy.reset()

    def _unet_eps(self, cfg_type: str, x_t: torch.Tensor, schedule: SlotSchedule,
                  stock: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.config.frame_buffer_size
        unet_latents, unet_timesteps = guidance.expand_unet_inputs(cfg_type, x_t, schedule.timesteps, f)
        conditioning = self._prompt.layouts[(cfg_type, x_t.shape[0])]
        model_output = self.runner.unet(unet_latents, unet_timesteps, conditioning)
        return guidance.guide(cfg_type, model_output, stock, self.config.guidance_scale, self.config.delta, f)

    def _stream_inputs(self, state: _StreamState, config: EngineConfig, latents: torch.Tensor) -> UnetCall:
        schedule, noise, f = state.schedule, state.fixed_noise, config.frame_buffer_size
        newest = add_noise(latents, noise[:f], schedule.alpha[:f], schedule.beta[:f])
        x_t = torch.cat([newest, state.buffer])
        unet_latents, unet_timesteps = guidance.expand_unet_inputs(config.cfg_type, x_t, schedule.timesteps, f)
        return UnetCall(x_t, unet_latents, unet_timesteps, self._prompt.layouts[(config.cfg_type, x_t.shape[0])])

    def _stream_finish(self, state: _StreamState, config: EngineConfig, call: UnetCall,
                       model_output: torch.Tensor) -> torch.Tensor:
        schedule, noise, f = state.schedule, state.fixed_noise, config.frame_buffer_size
        eps, stock = guidance.guide(config.cfg_type, model_output, state.stock_noise, config.guidance_scale,
                                    config.delta, f)
        x0 = predict_x0(call.x_t, eps, schedule)
        if stock is not None:
            state.stock_noise = guidance.next_stock_noise(eps, stock, noise, schedule)
        state.buffer = add_noise(x0[:-f], noise[f:], schedule.alpha[f:], schedule.beta[f:])
        return x0[-f:]

    def _stream_call(self, state: _StreamState, latents: torch.Tensor) -> torch.Tensor:
        """One UNet call over every slot; returns the oldest slot's x̂0 (`frame_buffer_size` rows)."""
        call = self._stream_inputs(state, self.config, latents)
        if self.skip_policy is not None:
            model_output = self.skip_policy.unet(call.latents, call.timesteps, call.conditioning,
                                                 SlotFrame(call.x_t, state.schedule, state.fixed_noise))
        else:
            model_output = self.runner.unet(call.latents, call.timesteps, call.conditioning)
        return self._stream_finish(state, self.config, call, model_output)

    def _sequential_call(self, state: _StreamState, latents: torch.Tensor) -> torch.Tensor:
        """The same steps one UNet call at a time, for one input (the stream batch's reference)."""
        cfg_type, n, f = self.config.cfg_type, self.config.denoising_steps, self.config.frame_buffer_size
        noise = state.fixed_noise
        stock = noise[:f] if guidance.uses_stock_noise(cfg_type) else None
        current = state.schedule.slots(0, 1)
        x_t = add_noise(latents, noise[:f], current.alpha, current.beta)
        for k in range(n):
            step_cfg = "self" if cfg_type == "initialize" and k > 0 else cfg_type
            eps, stock = self._unet_eps(step_cfg, x_t, current, stock)
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
