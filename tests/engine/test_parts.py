"""Per-stream features are parts (issue 24 item 1): the stream calls every part at the same points, whatever the
feature, and a part that refuses a config changes nothing."""

from __future__ import annotations

import inspect

import pytest
import torch

from engine import StreamConfig, StreamEngine
from engine.parts import StreamPart

SIZE = 32


class Recording:
    """A part that records what the stream asks of it (and may refuse configs)."""

    def __init__(self, refuse: str | None = None):
        self.calls: list[tuple] = []
        self.refuse = refuse

    def check(self, config, runner):
        self.calls.append(("check",))
        if self.refuse is not None and config.prompt == self.refuse:
            raise ValueError("refused by the recording part")

    def update(self, old, new, runner, fresh):
        self.calls.append(("update", new.prompt, fresh))

    def primed(self, config):
        self.calls.append(("primed", config.denoising_steps))

    def reset(self):
        self.calls.append(("reset",))


def test_every_part_implements_the_part_interface(tiny_engine):
    stream = StreamEngine(tiny_engine, StreamConfig(width=SIZE, height=SIZE))
    names = [name for name, _ in inspect.getmembers(StreamPart, inspect.isfunction) if not name.startswith("_")]
    assert set(names) == {"check", "update", "primed", "reset"}
    for part in stream.parts:
        for name in names:
            ours, declared = inspect.signature(getattr(part, name)), inspect.signature(getattr(StreamPart, name))
            assert list(ours.parameters) == list(declared.parameters)[1:], (type(part).__name__, name)


def test_the_stream_calls_every_part_at_the_same_points(tiny_engine):
    stream = StreamEngine(tiny_engine, StreamConfig(width=SIZE, height=SIZE, similarity_filter=False))
    recording = Recording()
    stream.parts = (*stream.parts, recording)
    frame = torch.rand(3, SIZE, SIZE)
    stream(frame)
    assert recording.calls == [("primed", 2)]  # the first frame primed the buffer
    prompt = stream.config.prompt
    stream.update_params(guidance_scale=1.1)  # hot, the frames still fit: not fresh
    stream.update_params(prompt="a red fox")  # the earlier frames no longer fit: fresh
    assert recording.calls[1:] == [("check",), ("update", prompt, False), ("check",), ("update", "a red fox", True)]
    stream.reset()
    assert recording.calls[-1] == ("reset",)
    stream(frame)
    assert recording.calls[-1] == ("primed", 2)


def test_a_part_that_refuses_a_config_changes_nothing(tiny_engine):
    stream = StreamEngine(tiny_engine, StreamConfig(width=SIZE, height=SIZE, prompt="a cat"))
    recording = Recording(refuse="a dog")
    stream.parts = (*stream.parts, recording)
    before = (stream.config, stream.prompt)
    with pytest.raises(ValueError, match="refused by the recording part"):
        stream.update_params(prompt="a dog", guidance_scale=1.3)
    assert (stream.config, stream.prompt) == before
    assert [call[0] for call in recording.calls] == ["check"]  # no part was updated
