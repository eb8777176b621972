"""Backend test fixtures: one ONNX cache folder per test session, so each graph is exported once; torch's threads
given back after a test whose ONNX Runtime engine took them."""

from __future__ import annotations

import os

import pytest
import torch

from engine.backends import onnxruntime as ort_backend
from engine.backends.cache import CACHE_DIR_ENV


@pytest.fixture(scope="session", autouse=True)
def onnx_cache_dir(tmp_path_factory):
    """The session's cache folder; engines built with the default cache folder use it too."""
    folder = tmp_path_factory.mktemp("trt_cache")
    previous = os.environ.get(CACHE_DIR_ENV)
    os.environ[CACHE_DIR_ENV] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(CACHE_DIR_ENV, None)
    else:
        os.environ[CACHE_DIR_ENV] = previous


@pytest.fixture
def keep_torch_threads(monkeypatch):
    """An ONNX Runtime engine (or `auto` choosing one) hands torch's threads to it process-wide: give them back after
    the test."""
    monkeypatch.setattr(ort_backend, "_claimed_threads", None)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
