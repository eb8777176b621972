"""The `demo` model's canny ControlNet (engine/demo_controlnet), trained on a CPU like the stylizer.

`python -m training.demo_controlnet` trains it (`train`) with the `demo` model frozen; `--eval` compares the
demo's output with and without it against the style filters (`evaluate`). Data, styles, crops and the
few-step denoising come from `training.demo_model`.
"""
