"""ptekit's messages: one logger tree ("ptekit.*") and one handler, which the command lines install.

Modules log through `get(__name__)`. `setup()` (the CLI, `python -m benchmarks`) sends the tree to
stderr, one plain line a message, written past any progress bar on the screen; `-q` keeps only
warnings and errors. Used as a library without setup, ptekit adds no handler: the application's
logging configuration decides.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

ROOT = "ptekit"


def get(name: str) -> logging.Logger:
    """The logger for a module: get(__name__) -> "ptekit.exporter.cli"."""
    return logging.getLogger(f"{ROOT}.{name}")


class _Handler(logging.Handler):
    """Writes each message on its own line to the current sys.stderr (exporter.quiet may have
    replaced it), through tqdm so that a bar being drawn is redrawn below the line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's own rule: a failed message never stops the run
            self.handleError(record)


def setup(quiet: bool = False) -> None:
    """The one handler: INFO and above on stderr, or only WARNING and above when quiet."""
    root = logging.getLogger(ROOT)
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    handler = _Handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


@contextmanager
def level(name: str | None, lvl: int):
    """Sets a logger's level (None: the root logger) for the duration of the block, then restores it."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(lvl)
    try:
        yield
    finally:
        logger.setLevel(saved)
