"""Control images for ControlNets: pure preprocessors from an input frame to the image a ControlNet reads.

`canny` (OpenCV edges) and `image` (the frame itself) are in `engine.control.preprocess`.
`DEMO_CONTROLNET_DIR` is the small canny ControlNet trained for the `demo` model
(`python -m training.demo_controlnet`, docs/controlnet.md), committed with the code.
"""

from __future__ import annotations

from pathlib import Path

from .preprocess import DEFAULT_HIGH_THRESHOLD, DEFAULT_LOW_THRESHOLD, canny, image

__all__ = ["DEFAULT_HIGH_THRESHOLD", "DEFAULT_LOW_THRESHOLD", "DEMO_CONTROLNET_DIR", "canny", "image"]

DEMO_CONTROLNET_DIR = Path(__file__).resolve().parent.parent / "demo_controlnet"
