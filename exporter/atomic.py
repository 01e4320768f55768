"""Atomic writes: every output appears whole or not at all (temp name, fsync, rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from exporter.errors import PtekitError

# mkstemp/mkdtemp create 0600/0700 entries; an output should get the mode a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_writable_dir(d: Path) -> Path:
    d = Path(d)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=d, prefix=".ptekit-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise PtekitError(f"{d}: output directory is not writable ({e.strerror}); choose another with -o") from None
    return d


@contextlib.contextmanager
def atomic_path(final: Path):
    """Yields a temp path beside `final`; on success renames it into place, on failure removes it."""
    final = Path(final)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(final: Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: Path, text: str) -> None:
    write_bytes(final, text.encode())


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yields a temp directory beside `final`; on success it replaces `final` whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
