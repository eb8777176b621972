"""One torch thread for these many small calls: on a loaded 2-core machine two threads spin-wait on
each other and make tiny-model steps several times slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
