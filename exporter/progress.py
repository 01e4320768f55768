"""A progress bar for steps that run inside a library call: one tick per phase, the clock kept
running by a background thread so a phase of several minutes never looks hung."""

from __future__ import annotations

import threading
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def phases(desc: str, total: int, enabled: bool = True):
    """Yields `advance(name)`: call it as each phase starts; the bar shows the phase and elapsed time."""
    bar = tqdm(total=total, desc=desc, unit="phase", disable=not enabled,
               bar_format="{desc}: {n_fmt}/{total_fmt}{postfix} [{elapsed}]")
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    if enabled:
        ticker.start()
    started = []

    def advance(name: str):
        if started:
            bar.update(1)
        started.append(name)
        bar.set_postfix_str(name, refresh=True)

    try:
        yield advance
        if started:
            bar.update(1)
    finally:
        stop.set()
        if enabled:
            ticker.join()
        bar.close()
