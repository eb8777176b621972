"""Shared fixtures: the tiny models (SD and SDXL architectures) are built once per test session."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, LoadConfig, load_models


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models():
    """The seeded random tiny model, shared read-only by every test."""
    return load_models("tiny")


@pytest.fixture(scope="session")
def tiny_engine(tiny_models):
    """The tiny model prepared for streaming on the eager backend (named: the default is `auto`), K/V cache on,
    memory off."""
    return Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager"))


@pytest.fixture(scope="session")
def tiny_sdxl_models():
    """The seeded random model of SDXL's architecture (`tiny-sdxl`), shared read-only by every test."""
    return load_models("tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_engine(tiny_sdxl_models):
    """`tiny-sdxl` prepared for streaming with the default load-time settings."""
    return Engine.prepare(tiny_sdxl_models, LoadConfig(model="tiny-sdxl", backend="eager"))


@pytest.fixture(scope="session")
def with_runner():
    """`with_runner(engine, runner)`: a copy of the loaded `engine` (same models, load config, device and dtype)
    whose streams all run on `runner`, e.g. a runner that records its calls.

    Streams take their runner from their `Engine` (`Engine.runner`), so a test that injects one gives them an
    `Engine` that hands out only that runner; the models are not prepared again. Streams of one such engine
    share the runner and batch together (`engine.batching.batch_key`), as streams of one loaded engine do.
    """

    return Engine.with_runner


@pytest.fixture(scope="session")
def tiny_controlnet_dir(tmp_path_factory):
    """A small ControlNet made from the tiny UNet (`ControlNetModel.from_unet`, random zero convolutions), saved
    as a diffusers folder."""
    from engine.controlnet import random_controlnet

    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    random_controlnet(load_models("tiny").unet, seed=5).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_controlnet_engine(tiny_controlnet_dir):
    """The tiny model with the saved tiny ControlNet (loaded from its folder), eager, canny preprocessor."""
    return Engine.load(LoadConfig(model="tiny", controlnet=str(tiny_controlnet_dir), backend="eager",
                                  device="cpu", dtype="float32"))
