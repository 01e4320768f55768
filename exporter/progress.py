"""Progress bars, one way for every long step (GGUF import, lowering, GPTQ, the methods' training
loops, evaluation, benchmark runs).

On a terminal: a tqdm bar. Written to a file or a CI log, a redrawn bar would repeat on one line every
second, so there each bar prints one line when its step ends instead. `ptekit ... -q` (set_quiet)
turns every bar off, including those deep inside the methods that no flag is passed down to.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

from tqdm import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def bar(iterable=None, **kw) -> tqdm:
    """A tqdm bar (same arguments) that follows the rules above."""
    if _quiet or kw.get("disable"):
        kw["disable"] = True
        return tqdm(iterable, **kw)
    file = kw.pop("file", None) or sys.stderr
    if file.isatty():
        return tqdm(iterable, file=file, **kw)
    return _LogLine(iterable, log=file, **kw)


class _LogLine(tqdm):
    """Counts like a bar but draws nothing; at close, one line: what, how far, how long."""

    def __init__(self, iterable=None, log=None, **kw):
        self._log = log
        self._sink = open(os.devnull, "w")
        kw.update(file=self._sink, mininterval=3600, miniters=0)
        super().__init__(iterable, **kw)

    def close(self):
        if not self.disable and self._log is not None:
            total = f"/{self.total:g}" if self.total else ""
            post = f" ({self.postfix})" if self.postfix else ""
            elapsed = self.format_interval(self._time() - self.start_t)
            self._log.write(f"{self.desc or 'progress'}: {self.n:g}{total} {self.unit}{post} in {elapsed}\n")
            self._log.flush()
        super().close()
        self._sink.close()


@contextmanager
def phases(desc: str, total: int, enabled: bool = True):
    """Yields `advance(name)`: call it as each phase starts; the bar shows the phase and elapsed time,
    its clock kept running by a background thread so a phase of several minutes never looks hung."""
    b = bar(total=total, desc=desc, unit="phase", disable=not enabled,
            bar_format="{desc}: {n_fmt}/{total_fmt}{postfix} [{elapsed}]")
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            b.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    live = not b.disable and isinstance(b, tqdm) and not isinstance(b, _LogLine)
    if live:
        ticker.start()
    started = []

    def advance(name: str):
        if started:
            b.update(1)
        started.append(name)
        b.set_postfix_str(name, refresh=live)

    try:
        yield advance
        if started:
            b.update(1)
    finally:
        stop.set()
        if live:
            ticker.join()
        b.close()
