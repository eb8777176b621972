"""What every benchmark command does around its measurement: log progress the same way, write its JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def start_logging() -> None:
    """Progress at INFO with timestamps, as every `python -m benchmarks.*` command logs it."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)


def write_json(path: Path | None, results: dict) -> None:
    """`results` as indented JSON at `path` (its folder made first); nothing when `path` is None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
