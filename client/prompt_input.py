"""Prompt changes mid-stream: lines typed on stdin, and a small key-by-key editor for the OpenCV window."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import TextIO

ENTER_KEYS = frozenset({10, 13})
ESCAPE_KEY = 27
BACKSPACE_KEYS = frozenset({8, 127})
START_KEY = ord("p")
MAX_PROMPT_CHARS = 500


class PromptEditor:
    """Pure key handling: `p` starts typing, printable keys append, Backspace deletes, Esc cancels, Enter
    commits. `feed` returns the committed prompt (stripped, non-empty) or `None`."""

    def __init__(self) -> None:
        self.editing = False
        self.text = ""

    def feed(self, key: int) -> str | None:
        key &= 0xFF  # waitKey may set modifier bits above the character
        if not self.editing:
            if key == START_KEY:
                self.editing, self.text = True, ""
            return None
        if key in ENTER_KEYS:
            self.editing = False
            committed = self.text.strip()
            return committed or None
        if key == ESCAPE_KEY:
            self.editing, self.text = False, ""
        elif key in BACKSPACE_KEYS:
            self.text = self.text[:-1]
        elif 32 <= key < 127 and len(self.text) < MAX_PROMPT_CHARS:
            self.text += chr(key)
        return None


def follow_lines(queue: asyncio.Queue[str], loop: asyncio.AbstractEventLoop, stream: TextIO = sys.stdin) -> None:
    """Forward each non-empty line of `stream` to `queue` from a daemon thread (reading stdin blocks, and a
    blocked read cannot be cancelled, so it must not hold up shutdown)."""

    def read() -> None:
        for line in stream:
            prompt = line.strip()
            if prompt:
                loop.call_soon_threadsafe(queue.put_nowait, prompt)

    threading.Thread(target=read, name="stdin-prompts", daemon=True).start()
