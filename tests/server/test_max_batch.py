"""`--max-batch` and `--batch-wait-ms` reach the runtime; `--threads` sets torch's threads."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig
from server.serve import configure_threads
from server.settings import ServerSettings, parse_settings
from server.state import ServerState


def test_max_batch_flag_and_environment():
    assert parse_settings([], environ={}).max_batch == ServerSettings().max_batch
    assert parse_settings(["--max-batch", "3"], environ={}).max_batch == 3
    assert parse_settings([], environ={"STREAMDIFF_MAX_BATCH": "2"}).max_batch == 2
    with pytest.raises(SystemExit):
        parse_settings(["--max-batch", "0"], environ={})


def test_batch_wait_flag_and_environment():
    assert parse_settings([], environ={}).batch_wait_ms == ServerSettings().batch_wait_ms
    assert parse_settings(["--batch-wait-ms", "7.5"], environ={}).batch_wait_ms == 7.5
    assert parse_settings([], environ={"STREAMDIFF_BATCH_WAIT_MS": "3"}).batch_wait_ms == 3
    with pytest.raises(SystemExit):
        parse_settings(["--batch-wait-ms", "-1"], environ={})


def test_the_runtime_batches_as_configured(tiny_models):
    settings = ServerSettings(engine=EngineConfig(width=32, height=32), max_batch=3, batch_wait_ms=20,
                              warmup=False)
    state = ServerState(settings, models=tiny_models)
    state.start()
    try:
        assert (state.runtime.max_batch, state.runtime.batch_wait_s) == (3, 0.02)
    finally:
        state.close()


def test_threads_flag_environment_and_effect():
    assert parse_settings([], environ={}).threads == ServerSettings().threads == 0
    assert parse_settings(["--threads", "1"], environ={}).threads == 1
    assert parse_settings([], environ={"STREAMDIFF_THREADS": "2"}).threads == 2
    with pytest.raises(SystemExit):
        parse_settings(["--threads", "-1"], environ={})
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 == torch.get_num_threads()
        torch.set_num_threads(9)
        assert configure_threads(0) == 2  # 9 cores shared by the 4 model threads (two input threads)
        torch.set_num_threads(2)
        assert configure_threads(0) == 1
    finally:
        torch.set_num_threads(before)
