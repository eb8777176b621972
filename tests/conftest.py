"""Shared fixtures: the tiny model is built once per test session."""

from __future__ import annotations

import pytest
import torch

from engine import load_models


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_models():
    """The seeded random tiny model, shared read-only by every test."""
    return load_models("tiny")
