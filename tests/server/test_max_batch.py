"""`--max-batch` reaches the runtime."""

from __future__ import annotations

import pytest

from engine import EngineConfig
from server.settings import ServerSettings, parse_settings
from server.state import ServerState


def test_max_batch_flag_and_environment():
    assert parse_settings([], environ={}).max_batch == ServerSettings().max_batch
    assert parse_settings(["--max-batch", "3"], environ={}).max_batch == 3
    assert parse_settings([], environ={"STREAMDIFF_MAX_BATCH": "2"}).max_batch == 2
    with pytest.raises(SystemExit):
        parse_settings(["--max-batch", "0"], environ={})


def test_the_runtime_batches_as_configured(tiny_models):
    settings = ServerSettings(engine=EngineConfig(width=32, height=32), max_batch=3, warmup=False)
    state = ServerState(settings, models=tiny_models)
    state.start()
    try:
        assert state.runtime.max_batch == 3
    finally:
        state.close()
