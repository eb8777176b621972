"""Temporal steadiness of one stream (`StreamConfig.temporal`): less flicker on live video, without blur.

Three mechanisms, each per stream and each starting over on a cut (an input latent that changed by more than
`cut_threshold` relative L1), a prompt change, `reset` and a re-prepare:

- `flow`: the output carried along the input's optical flow. The previous output is warped to the new frame
  with the flow between the two input frames and blended in, `out' = out + a·m·g·(warp(prev') − out)`, where
  `m` is 1 only where that flow lands inside the picture and the motion-compensated input agrees within
  `PHOTOMETRIC_TOLERANCE` (occluded, uncovered and mismatched pixels keep the fresh output, so motion never ghosts),
  and `g = exp(−(d/tolerance)²)` of the two outputs' difference d keeps new structure and misaligned edges
  sharp while the small differences of flicker are smoothed (a temporal bilateral filter).
- `feedback`: the previous newest-slot x̂0 latent blended into the next input latent,
  `z' = z + w·(x̂0_prev − z)` with `w = s·exp(−motion/τ)` per latent cell, motion being the cell's change
  from the previous input latent (so moving regions do not ghost).
- `bank` (StreamV2V, arXiv 2405.15757): each self-attention layer also attends to the keys and values of
  the same stream-batch rows in the last `bank_size` frames (extended self-attention), and tokens whose
  attention output closely matches a banked one take part of it (feature injection).

The stream batch outputs the frame that entered n − 1 calls ago, so the flow of an output is the one its own
input frame brought: motions travel through a queue as long as the stream batch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .config import StreamConfig, TemporalSettings
from .motion import gray, lands_inside, optical_flow, sampling_grid, warp, warp_tensor

#: Motion-compensated input error (0-255 luminance) above which a pixel's flow is not trusted. It is the whole
#: occlusion test (an occluded or uncovered pixel's warped input does not match): one flow per frame instead of a
#: forward-backward pair, which halved the mechanism's cost at the same steadiness (docs/temporal.md).
PHOTOMETRIC_TOLERANCE = 6.0
#: Flow shorter than this (pixels) is taken as no motion: on a still scene it is sensor (and JPEG) noise, and
#: resampling along it would only blur the carried output (docs/temporal.md has the measurement).
STILL_FLOW_PX = 0.5
#: Flow is estimated with frames scaled to at most this many pixels on their long side: it is most of the
#: mechanism's cost; at 256² 160 px kept its effect and its detail (docs/temporal.md).
FLOW_SIDE = 160


@dataclass(frozen=True)
class Motion:
    """What the `flow` mechanism needs to carry frame t−1's output to frame t.

    `grid`: the input's flow from t to t−1 as a `grid_sample` grid; `mask`: (1, 1, H, W) where it is trusted;
    `cut`: frame t starts a new scene (nothing is carried).
    """

    grid: torch.Tensor | None
    mask: torch.Tensor | None
    cut: bool


def relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """|current − previous|₁ / |previous|₁ (a tiny floor keeps an all-zero reference finite).

    Summed in float32: in float16 a large frame's latent sum overflows to inf and the ratio is 0 (or NaN), so no
    cut was ever seen."""
    return float((current - previous).abs().sum(dtype=torch.float32)
                 / previous.abs().sum(dtype=torch.float32).clamp_min(1e-12))


def feedback_weight(latents: torch.Tensor, previous: torch.Tensor, strength: float,
                    motion_scale: float) -> torch.Tensor:
    """Per latent cell (N, 1, h, w): `strength·exp(−motion/motion_scale)`, motion = the cell's mean |Δ| over
    channels relative to the previous latent's mean magnitude."""
    motion = (latents - previous).abs().mean(1, keepdim=True) / previous.abs().mean().clamp_min(1e-12)
    return strength * torch.exp(-motion / motion_scale)


def _scaled_gray(rgb: np.ndarray, scale: float) -> np.ndarray:
    luminance = gray(rgb)
    if scale == 1:
        return luminance
    height, width = luminance.shape
    return cv2.resize(luminance, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)


def input_motion(previous_rgb: np.ndarray, current_rgb: np.ndarray, cut_threshold: float,
                 device: torch.device, dtype: torch.dtype) -> Motion:
    """The `Motion` from one input frame (RGB, 0-255) to the next: Farneback flow (on frames scaled to
    `FLOW_SIDE`), trusted where it lands inside the picture and the motion-compensated luminance agrees, and
    whether it is a cut."""
    height, width = current_rgb.shape[:2]
    scale = min(1.0, FLOW_SIDE / max(height, width))
    previous, current = _scaled_gray(previous_rgb, scale), _scaled_gray(current_rgb, scale)
    flow = optical_flow(current, previous)
    flow[np.linalg.norm(flow, axis=-1) < STILL_FLOW_PX * scale] = 0
    error = np.abs(warp(previous, flow) - current)
    if float(error.mean()) > cut_threshold * max(float(current.mean()), 1.0):
        return Motion(None, None, cut=True)
    trusted = lands_inside(flow) & (error <= PHOTOMETRIC_TOLERANCE)
    if scale != 1:
        flow = cv2.resize(flow, (width, height), interpolation=cv2.INTER_LINEAR) / scale
        trusted = cv2.resize(trusted.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    mask = torch.from_numpy(trusted.astype(np.float32)).to(device=device, dtype=dtype)[None, None]
    # The grid holds positions in [-1, 1], so it stays float32: bfloat16 steps 2⁻⁷ near ±1, which is a whole
    # pixel at 256 px, and float16 a quarter pixel at 1024 px (the carried output landed shifted).
    return Motion(sampling_grid(flow, device, torch.float32), mask, cut=False)


class AttentionBank:
    """The self-attention keys, values and outputs of a stream's recent frames, per layer and UNet row.

    `CachedKVAttnProcessor` calls `extend` and `inject` from inside the UNet; the stream calls `commit` after
    each UNet call and `reset` on a cut, a prompt change or a new layout. Bounded: `settings.bank_size` frames.
    """

    def __init__(self, settings: TemporalSettings):
        self.settings = settings
        self._frames: dict[str, deque[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._calls = 0
        # `padded` tensors per (layer, capacity), kept until the banked frames change.
        self._padded: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        self._frames.clear()
        self._pending.clear()
        self._padded.clear()
        self._calls = 0

    def _banked(self, name: str, rows: int) -> deque | None:
        frames = self._frames.get(name)
        if frames and frames[0][0].shape[0] != rows:  # another layout (guidance, steps): nothing matches
            self.reset()
            return None
        return frames

    def extend(self, name: str, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `name`'s keys and values (rows, heads, tokens, dim) with the banked frames' appended."""
        self._pending[name] = [key, value]
        frames = self._banked(name, key.shape[0])
        if not frames:
            return key, value
        return (torch.cat([key, *(frame[0] for frame in frames)], dim=2),
                torch.cat([value, *(frame[1] for frame in frames)], dim=2))

    def attention_mask(self, name: str, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The attention mask of layer `name`'s extended self-attention: the one given (the eager bank
        concatenates only banked frames, so nothing is masked; `PaddedBank` masks its empty slots)."""
        return attention_mask

    def inject(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s attention output (rows, tokens, channels) with feature injection from the bank."""
        pending = self._pending.get(name)
        if pending is not None and len(pending) == 2:
            pending.append(hidden)
        frames = self._banked(name, hidden.shape[0])
        if not frames or self.settings.injection_strength == 0:
            return hidden
        banked = torch.cat([frame[2] for frame in frames], dim=1)
        similarity = F.normalize(hidden, dim=-1) @ F.normalize(banked, dim=-1).transpose(1, 2)
        best, index = similarity.max(dim=-1)
        matched = torch.gather(banked, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        weight = self.settings.injection_strength * (best >= self.settings.injection_threshold).to(hidden.dtype)
        return hidden + weight.unsqueeze(-1) * (matched - hidden)

    def commit(self) -> None:
        """Keep this call's keys, values and outputs as a banked frame (every `bank_interval` calls)."""
        pending, self._pending = self._pending, {}
        self._calls += 1
        if (self._calls - 1) % self.settings.bank_interval:
            return
        for name, entry in pending.items():
            if len(entry) == 3:
                self._frames.setdefault(name, deque(maxlen=self.settings.bank_size)).append(tuple(entry))
                self._padded.clear()

    # ------------------------------------------------------------------ for compiled graphs (`PaddedBank`)

    @property
    def capacity(self) -> int:
        """Most frames the bank holds now: its layers' bound, set when their first frame came (a hot
        `bank_size` change takes effect at the next reset, as in the eager UNet), else `settings.bank_size`.
        A compiled graph's bank inputs are padded to this many frames."""
        for frames in self._frames.values():
            return int(frames.maxlen)
        return self.settings.bank_size

    def frame_count(self, rows: int) -> int:
        """Frames banked for a UNet call of `rows` rows; a bank of another layout is reset first (as `extend`)."""
        for name in list(self._frames):
            frames = self._banked(name, rows)
            return len(frames) if frames else 0
        return 0

    def padded(self, name: str, shapes: tuple[tuple[int, ...], ...], capacity: int,
               like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer `name`'s banked keys and values `(rows, heads, capacity·tokens, dim)` and attention outputs
        `(rows, capacity·tokens, channels)`: the banked frames oldest first along the token axis (the order
        `extend` and `inject` concatenate them in), then zeros for the empty slots. `shapes`: one frame's key,
        value and output shapes; the zeros take `like`'s device and dtype."""
        cached = self._padded.get((name, capacity))
        if cached is not None:
            return cached
        frames = self._frames.get(name) or ()
        if len(frames) > capacity:
            raise ValueError(f"layer {name!r} banks {len(frames)} frames, more than the capacity {capacity}")
        parts = []
        for index, shape in enumerate(shapes):
            axis = 2 if index < 2 else 1  # keys and values (rows, heads, tokens, dim); outputs (rows, tokens, ch)
            tensors = [frame[index] for frame in frames]
            empty = capacity - len(tensors)
            if empty:
                tensors.append(like.new_zeros(*shape[:axis], shape[axis] * empty, *shape[axis + 1:]))
            parts.append(torch.cat(tensors, dim=axis).contiguous())
        padded = (parts[0], parts[1], parts[2])
        self._padded[(name, capacity)] = padded
        return padded

    def record(self, name: str, key: torch.Tensor, value: torch.Tensor, output: torch.Tensor) -> None:
        """Layer `name`'s keys, values and (not yet injected) attention outputs of this call, from a compiled
        graph's outputs: what `extend` and `inject` note in the eager UNet, banked by the next `commit`."""
        self._pending[name] = [key, value, output]


class PaddedBank:
    """`AttentionBank`'s `extend` and `inject` over graph inputs: what the compiled UNet graphs with an attention
    bank run (`engine.backends.onnx_export`).

    Each self-attention layer's banked keys, values and attention outputs come padded to a fixed capacity of
    frames along the token axis (`AttentionBank.padded`), with `mask` (capacity,): 0 for a banked frame, −inf for
    an empty slot. An empty slot's tokens get −inf added to their attention logits and to their similarity in
    feature injection, so they take no part: the result is the eager bank's over the banked frames alone (float
    rounding aside), an empty bank included. `threshold` and `strength` (shape (1,)) are inputs too, so they stay
    hot. Each layer's keys, values and outputs of this call are noted in `recorded` (the graph's extra outputs).
    """

    def __init__(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                 threshold: torch.Tensor, strength: torch.Tensor):
        self.layers = layers
        self.mask = mask
        self.threshold = threshold
        self.strength = strength
        self.recorded: dict[str, list[torch.Tensor]] = {}

    def _slot_mask(self, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """(capacity·tokens,): each slot's mask repeated over its tokens."""
        return self.mask[:, None].expand(-1, tokens).reshape(-1).to(dtype)

    def extend(self, name: str, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.recorded[name] = [key, value]
        banked_key, banked_value, _ = self.layers[name]
        return torch.cat([key, banked_key], dim=2), torch.cat([value, banked_value], dim=2)

    def attention_mask(self, name: str, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Additive (1, 1, 1, tokens + capacity·tokens): 0 on this frame's keys and the banked frames', −inf on the
        empty slots'."""
        if attention_mask is not None:
            raise ValueError("an attention bank's graph takes no other self-attention mask")
        key = self.recorded[name][0]
        tokens = key.shape[2]
        mask = torch.cat([key.new_zeros(tokens), self._slot_mask(tokens, key.dtype)])
        return mask.view(1, 1, 1, -1)

    def inject(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        self.recorded[name].append(hidden)
        banked = self.layers[name][2]
        similarity = F.normalize(hidden, dim=-1) @ F.normalize(banked, dim=-1).transpose(1, 2)
        similarity = similarity + self._slot_mask(hidden.shape[1], similarity.dtype)
        best, index = similarity.max(dim=-1)
        matched = torch.gather(banked, 1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        # An empty bank: every similarity is −inf, so no token reaches the threshold and `matched` (zeros) gets
        # weight 0; strength 0 likewise. Either leaves `hidden` exactly as it was.
        weight = self.strength * (best >= self.threshold).to(hidden.dtype)
        return hidden + weight.unsqueeze(-1) * (matched - hidden)


class TemporalFilter:
    """One stream's temporal mechanism (`StreamConfig.temporal`) and its state; see the module docstring.

    The stream calls `observe_input` in its input stage, `restart`/`enter`/`after_call` around each
    stream-batch UNet call, and `blend_output` in its output stage; each stage touches only its own fields,
    so the three may run on three threads.

    Args:
        config (`StreamConfig`): the stream's parameters (`temporal`, `temporal_settings`).
        device (`torch.device`), dtype (`torch.dtype`): the stream's.
    """

    def __init__(self, config: StreamConfig, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.mode = config.temporal
        self.settings = config.temporal_settings
        self.bank = AttentionBank(self.settings) if self.mode == "bank" else None
        self._previous_input: np.ndarray | None = None
        self._previous_latents: torch.Tensor | None = None
        self._previous_x0: torch.Tensor | None = None
        self._motions: deque[Motion | None] = deque()
        self._previous_output: torch.Tensor | None = None

    def update(self, config: StreamConfig) -> None:
        """New tunables from the next frame (a mode change builds a new filter instead)."""
        self.settings = config.temporal_settings
        if self.bank is not None:
            self.bank.settings = self.settings

    def reset(self) -> None:
        """Start over: nothing of earlier frames is carried into the next ones."""
        self._previous_input = self._previous_latents = self._previous_x0 = self._previous_output = None
        self._motions.clear()
        if self.bank is not None:
            self.bank.reset()

    # ------------------------------------------------------------------ input stage

    def observe_input(self, images: torch.Tensor) -> Motion | None:
        """`flow`: the motion from the last input let through to `images` (one frame in [-1, 1])."""
        if self.mode != "flow":
            return None
        rgb = ((images[0].float() + 1) * 127.5).clamp(0, 255).permute(1, 2, 0).cpu().numpy()
        previous, self._previous_input = self._previous_input, rgb
        if previous is None:
            return Motion(None, None, cut=True)
        return input_motion(previous, rgb, self.settings.cut_threshold, self.device, self.dtype)

    # ------------------------------------------------------------------ inference stage

    def enter(self, latents: torch.Tensor, motion: Motion | None) -> tuple[torch.Tensor, Motion | None]:
        """A frame with VAE latents `latents` and input `motion` enters the stream batch: the latent to noise
        (with `feedback`, blended with the previous newest-slot x̂0) and the motion of the frame it outputs.

        A cut (the latent changed by more than `cut_threshold`) starts every mechanism over.
        """
        if self.mode == "off":
            return latents, None
        previous, self._previous_latents = self._previous_latents, latents
        cut = previous is None or previous.shape != latents.shape \
            or relative_change(latents, previous) > self.settings.cut_threshold
        if cut:
            self._previous_x0 = None
            if self.bank is not None:
                self.bank.reset()
            if motion is not None:
                motion = Motion(None, None, cut=True)
        self._motions.append(motion)
        output_motion = self._motions[0] if len(self._motions) == self._motions.maxlen else None
        if cut or self.mode != "feedback" or self._previous_x0 is None:
            return latents, output_motion
        weight = feedback_weight(latents, previous, self.settings.feedback_strength, self.settings.motion_scale)
        return latents + weight * (self._previous_x0 - latents), output_motion

    def after_call(self, x0: torch.Tensor, frames_per_slot: int) -> None:
        """After a stream-batch UNet call: keep the newest slot's x̂0 and this call's bank entries."""
        if self.mode == "feedback":
            self._previous_x0 = x0[:frames_per_slot]
        if self.bank is not None:
            self.bank.commit()

    def restart(self, slots: int) -> None:
        """The stream (re)primed its buffer: `slots` − 1 priming calls whose outputs nobody sees."""
        self._motions = deque([None] * (slots - 1), maxlen=slots)
        self._previous_output = None
        if self.bank is not None:
            self.bank.reset()

    # ------------------------------------------------------------------ output stage

    def blend_output(self, output: torch.Tensor, motion: Motion | None) -> torch.Tensor:
        """`flow`: the output (1, 3, H, W) in [0, 1] with the previous output carried along the flow."""
        if self.mode != "flow":
            return output
        previous, blended = self._previous_output, output
        if previous is not None and motion is not None and not motion.cut and previous.shape == output.shape:
            # Bicubic: each frame re-samples the carried output, and bilinear's low-pass would accumulate.
            carried = warp_tensor(previous, motion.grid, mode="bicubic").clamp(0, 1)
            difference = (carried - output).abs().mean(1, keepdim=True)
            weight = self.settings.strength * motion.mask * torch.exp(-(difference / self.settings.tolerance) ** 2)
            blended = output + weight * (carried - output)
        self._previous_output = blended
        return blended
