"""A real uvicorn server on an ephemeral loopback port, in a background thread, for the server tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from server_testkit import TEST_SETTINGS, LiveServer

from engine import Engine, LoadConfig, load_models
from server.app import create_app
from server.serve import background_server


@pytest.fixture(scope="session")
def server_engine():
    """The tiny model with its full VAE (see `TEST_LOAD`), loaded once for every test server."""
    return Engine.prepare(load_models("tiny", use_tiny_vae=False), TEST_SETTINGS.load)


@pytest.fixture(scope="session")
def start_server(server_engine):
    """A context manager factory: `with start_server(**setting_changes) as live: ...`."""

    @contextmanager
    def start(**changes) -> Iterator[LiveServer]:
        settings = TEST_SETTINGS.replace(**changes)
        app = create_app(settings, engine=server_engine)
        with background_server(app, settings) as base_url:
            yield LiveServer(base_url, settings, app.state.server)

    return start


@pytest.fixture(scope="session")
def live_server(start_server) -> Iterator[LiveServer]:
    """The shared test server (tiny model, 64x64, no token)."""
    with start_server() as live:
        yield live


@pytest.fixture
def server(live_server) -> Iterator[LiveServer]:
    """The shared server; after the test every session must be gone and no thread left behind."""
    threads_before = {thread.name for thread in threading.enumerate()}
    yield live_server
    state = live_server.state
    deadline_checks = 600
    while len(state.sessions) and deadline_checks:
        threading.Event().wait(0.05)
        deadline_checks -= 1
    assert len(state.sessions) == 0, "a session leaked"
    leaked = {thread.name for thread in threading.enumerate()} - threads_before
    assert not {name for name in leaked if name.startswith(("stream-", "model-loader"))}, leaked


@pytest.fixture(scope="session")
def controlnet_server(tiny_controlnet_dir) -> Iterator[LiveServer]:
    """A test server whose engine has the tiny ControlNet (loaded from its folder)."""
    load = LoadConfig(model="tiny", vae="full", backend="eager", controlnet=str(tiny_controlnet_dir))
    settings = TEST_SETTINGS.replace(load=load)
    app = create_app(settings, engine=Engine.load(load))
    with background_server(app, settings) as base_url:
        yield LiveServer(base_url, settings, app.state.server)

