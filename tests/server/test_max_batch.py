"""`--max-batch` and `--batch-wait-ms` reach the runtime; `--threads` sets torch's threads."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, LoadConfig, StreamConfig
from server.serve import configure_threads
from server.settings import ServerSettings, parse_settings
from server.state import ServerState


def test_max_batch_flag_and_environment():
    assert parse_settings([], environ={}).runtime.max_batch == ServerSettings().runtime.max_batch
    assert parse_settings(["--max-batch", "3"], environ={}).runtime.max_batch == 3
    assert parse_settings([], environ={"STREAMDIFF_MAX_BATCH": "2"}).runtime.max_batch == 2
    with pytest.raises(SystemExit):
        parse_settings(["--max-batch", "0"], environ={})


def test_batch_wait_flag_and_environment():
    assert parse_settings([], environ={}).runtime.batch_wait_s == ServerSettings().runtime.batch_wait_s
    assert parse_settings(["--batch-wait-ms", "7.5"], environ={}).runtime.batch_wait_s == 0.0075
    assert parse_settings([], environ={"STREAMDIFF_BATCH_WAIT_MS": "3"}).runtime.batch_wait_s == 0.003
    with pytest.raises(SystemExit):
        parse_settings(["--batch-wait-ms", "-1"], environ={})


def test_the_runtime_batches_as_configured(tiny_models):
    settings = parse_settings(["--model", "tiny", "--width", "32", "--height", "32", "--max-batch", "3",
                               "--batch-wait-ms", "20", "--no-warmup"], environ={})
    state = ServerState(settings, Engine.prepare(tiny_models, LoadConfig(model="tiny", backend="eager")))
    state.start()
    try:
        options, defaults = state.runtime.options, state.runtime.defaults
        assert (options.max_batch, options.batch_wait_s) == (3, 0.02)
        assert (defaults.width, defaults.height) == (32, 32) and defaults == StreamConfig(width=32, height=32)
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
