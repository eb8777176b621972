import asyncio
import io

import numpy as np
import pytest

from client.frames import decode_jpeg, encode_jpeg, fit_frame
from client.pacing import next_due
from client.prompt_input import PromptEditor, follow_lines


def test_fit_frame_centre_crops_to_the_aspect_then_resizes():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 50:150] = 255  # the centre square is white, the sides black
    fitted = fit_frame(image, 32, 32)
    assert fitted.shape == (32, 32, 3)
    assert fitted.min() == 255
    assert fit_frame(image, 200, 100) is image
    assert fit_frame(image, 64, 16).shape == (16, 64, 3)


def test_jpeg_round_trip_keeps_size_and_content():
    image = np.full((24, 40, 3), (30, 120, 200), np.uint8)
    decoded = decode_jpeg(encode_jpeg(image, quality=95))
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image).max() <= 3
    with pytest.raises(ValueError):
        decode_jpeg(b"not a jpeg")


def test_pacing_keeps_cadence_but_never_bursts():
    assert next_due(1.0, 0.1, now=1.05) == pytest.approx(1.1)
    assert next_due(1.0, 0.1, now=1.15) == pytest.approx(1.1)  # a little late: keep the cadence
    assert next_due(1.0, 0.1, now=3.0) == 3.0  # far behind: restart from now
    assert next_due(1.0, 0.0, now=2.0) == 2.0


def _type(editor, text):
    results = [editor.feed(ord(char)) for char in text]
    return [result for result in results if result is not None]


def test_prompt_editor_keys():
    editor = PromptEditor()
    assert _type(editor, "xyz") == [] and not editor.editing  # keys before `p` do nothing
    _type(editor, "pa catt")
    assert editor.editing and editor.text == "a catt"
    editor.feed(8)
    assert editor.feed(13) == "a cat" and not editor.editing
    _type(editor, "pdog")
    assert editor.feed(27) is None and not editor.editing and editor.text == ""
    _type(editor, "p  ")
    assert editor.feed(10) is None  # blank prompts are not sent


async def test_follow_lines_forwards_non_empty_lines():
    queue: asyncio.Queue[str] = asyncio.Queue()
    follow_lines(queue, asyncio.get_running_loop(), io.StringIO("a cat\n\n  a dog  \n"))
    received = [await asyncio.wait_for(queue.get(), 5), await asyncio.wait_for(queue.get(), 5)]
    assert received == ["a cat", "a dog"]


def test_the_clients_import_no_model_stack():
    """`pip install '.[client]'` installs no torch, diffusers or fastapi: the clients must not import them."""
    import subprocess
    import sys

    check = ("import sys, client.webcam, client.loadtest, wire; "
             "print(sorted({'torch', 'diffusers', 'transformers', 'fastapi', 'engine', 'server'} & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True, timeout=120)
    assert loaded.stdout.strip() == "[]", loaded.stdout
