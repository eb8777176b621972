"""Control sources: what turns a stream's input frames into its ControlNet's control images.

A source is chosen at load (`LoadConfig.control_preprocessor`) and shared by every stream of the engine; it
reads a stream's own settings (the canny thresholds) on each call. It runs on the input stage, beside the VAE
encoder, never on the UNet's thread. `depth` and `pose` need weights: offline, without them, building the
source fails at once with the weights' name and how to get them.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..config import LoadConfig, StreamConfig
from .preprocess import canny

logger = logging.getLogger(__name__)

#: The preprocessors' default weights (`LoadConfig.control_preprocessor_model` overrides them).
DEFAULT_PREPROCESSOR_MODELS: dict[str, str] = {
    "depth": "depth-anything/Depth-Anything-V2-Small-hf",
    "pose": "lllyasviel/Annotators",
}


class ControlSourceError(RuntimeError):
    """A control preprocessor cannot be built here (missing weights or package); the message says how to fix it."""


class ControlSource(Protocol):
    """Frames `[f, 3, H, W]` in [0, 1] to control images of the same shape, device and dtype, in [0, 1]."""

    name: str

    def __call__(self, frames: torch.Tensor, config: StreamConfig) -> torch.Tensor: ...


class CannySource:
    """OpenCV's canny edges of each frame, with the stream's `canny_low_threshold` / `canny_high_threshold`."""

    name = "canny"

    def __call__(self, frames: torch.Tensor, config: StreamConfig) -> torch.Tensor:
        return torch.stack([canny(frame, config.canny_low_threshold, config.canny_high_threshold)
                            for frame in frames.clamp(0, 1)])


class ImageSource:
    """The frames themselves (tile-like ControlNets)."""

    name = "image"

    def __call__(self, frames: torch.Tensor, config: StreamConfig) -> torch.Tensor:
        return frames


class DepthSource:
    """A transformers depth-estimation model (Depth Anything, DPT): relative depth, near is bright, normalised to
    [0, 1] per frame, as diffusers' depth ControlNet examples feed it."""

    name = "depth"

    def __init__(self, spec: str, device: torch.device):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        try:
            self.processor = AutoImageProcessor.from_pretrained(spec)
            self.model = AutoModelForDepthEstimation.from_pretrained(spec).to(device).eval().requires_grad_(False)
        except Exception as error:  # OSError offline, ValueError for a folder of another kind
            raise ControlSourceError(
                f"the depth preprocessor's weights {spec!r} are not available here ({type(error).__name__}: {error}). "
                f"Download them where the hub is reachable (`huggingface-cli download {spec}`) into the hub cache, "
                "or pass `--control-preprocessor-model FOLDER` with a saved depth-estimation model (image processor "
                "and model)") from error
        self.device = device

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, config: StreamConfig) -> torch.Tensor:
        pixels = [frame.float().clamp(0, 1).permute(1, 2, 0).mul(255).round().byte().cpu().numpy() for frame in frames]
        inputs = self.processor(images=pixels, return_tensors="pt").to(self.device)
        depth = self.model(**inputs).predicted_depth.float().unsqueeze(1)
        depth = F.interpolate(depth, size=frames.shape[-2:], mode="bicubic", align_corners=False)
        low = depth.amin(dim=(1, 2, 3), keepdim=True)
        high = depth.amax(dim=(1, 2, 3), keepdim=True)
        spread = high - low
        # A flat depth map (a blank wall) has no near or far: all zeros, not a division by zero.
        depth = torch.where(spread > 0, (depth - low) / torch.where(spread > 0, spread, 1), 0)
        return depth.expand(-1, 3, -1, -1).to(device=frames.device, dtype=frames.dtype).contiguous()


class PoseSource:
    """controlnet_aux's OpenPose detector: the skeletons drawn on black, as OpenPose ControlNets were trained."""

    name = "pose"

    def __init__(self, spec: str):
        try:
            from controlnet_aux import OpenposeDetector
        except ImportError as error:
            raise ControlSourceError("the pose preprocessor needs controlnet_aux: `pip install controlnet_aux`, then "
                                     f"its weights {spec!r} (`huggingface-cli download {spec}`)") from error
        try:
            self.detector = OpenposeDetector.from_pretrained(spec)
        except Exception as error:  # hub errors offline
            raise ControlSourceError(
                f"the pose preprocessor's weights {spec!r} are not available here ({type(error).__name__}: {error}). "
                f"Download them where the hub is reachable (`huggingface-cli download {spec}`), or pass "
                "`--control-preprocessor-model FOLDER`") from error

    def __call__(self, frames: torch.Tensor, config: StreamConfig) -> torch.Tensor:
        from PIL import Image

        height, width = frames.shape[-2:]
        poses = []
        for frame in frames:
            pixels = frame.float().clamp(0, 1).permute(1, 2, 0).mul(255).round().byte().cpu().numpy()
            drawn = self.detector(Image.fromarray(pixels)).convert("RGB").resize((width, height))
            poses.append(torch.from_numpy(np.asarray(drawn).copy()).permute(2, 0, 1))
        return torch.stack(poses).to(device=frames.device, dtype=frames.dtype) / 255


def make_control_source(config: LoadConfig, device: torch.device) -> ControlSource:
    """The control source `config` names, with its weights loaded on `device`.

    Raises:
        ControlSourceError: `depth` or `pose` without their weights or package, saying how to get them.
    """
    name = config.control_preprocessor
    if name == "canny":
        return CannySource()
    if name == "image":
        return ImageSource()
    spec = config.control_preprocessor_model or DEFAULT_PREPROCESSOR_MODELS[name]
    logger.info("loading the %s preprocessor %r", name, spec)
    return DepthSource(spec, device) if name == "depth" else PoseSource(spec)
