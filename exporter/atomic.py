"""Atomic writes: every output appears whole or not at all (temp name, fsync, rename).

A file is written under a temp name beside its final one and renamed into place. A directory is
built under a temp name beside its final one and swapped with it in one rename (Linux
renameat2 RENAME_EXCHANGE), so a reader sees the old directory or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from exporter.errors import PtekitError

# mkstemp/mkdtemp create 0600/0700 entries; an output should get the mode a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def ensure_writable_dir(d: Path, create: bool = True) -> Path:
    """Checks that outputs can be written to d. create=False leaves a missing d uncreated (it is made
    when the output is committed) and checks its nearest existing parent instead."""
    d = Path(d)
    probe_in = d
    try:
        if create:
            d.mkdir(parents=True, exist_ok=True)
        else:
            while not probe_in.exists() and probe_in != probe_in.parent:
                probe_in = probe_in.parent
            if probe_in.exists() and not probe_in.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        probe = tempfile.NamedTemporaryFile(dir=probe_in, prefix=".ptekit-probe-", delete=True)
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


def write_files(files: dict) -> None:
    """Files that belong together ({path: bytes or str}): all are written and synced under temp names
    first, then renamed into place one after another, so a failure while writing any of them leaves
    none of them (and the previous versions as they were)."""
    with contextlib.ExitStack() as stack:
        for path, data in files.items():
            path = Path(path)
            try:
                tmp = stack.enter_context(atomic_path(path))
                tmp.write_bytes(data.encode() if isinstance(data, str) else data)
            except OSError as e:
                raise PtekitError(f"{path}: cannot write it ({e.strerror}); choose another path") from None


def _exchange(a: Path, b: Path) -> None:
    """Swaps two existing paths in one step (renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(old: Path, new: Path, keep: Callable[[str], bool]) -> None:
    """Puts the entries of old that keep() accepts into new, as hard links: nothing is copied and
    old is not modified, so old stays whole until the swap."""
    for entry in os.scandir(old):
        if not keep(entry.name) or os.path.lexists(new / entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(new / entry.name))


def _finish_tree(d: Path) -> None:
    """Every file under d synced, and given the read and write bits a plain open() would: safetensors'
    writer, for one, creates its files 0600, which would leave an imported checkpoint unreadable to other
    users."""
    for root, _, files in os.walk(d):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.fchmod(fd, (os.fstat(fd).st_mode & 0o777) | (0o666 & ~_UMASK))
                finally:
                    os.close(fd)


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C waits until the block has run: a swap and its cleanup are never left halfway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda *a: caught.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_dir(final: Path, keep: Callable[[str], bool] | None = None):
    """Yields a temp directory beside `final`; on success it replaces `final` whole.

    keep(name) chooses entries of an existing `final` that the new directory keeps (a method's
    resume state beside an export's files); the rest of the old directory goes. Until the swap the
    old directory is untouched, and a failure or Ctrl-C leaves no temp directory behind."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise PtekitError(f"{final}: exists and is not a directory; remove it or choose another output")
    made = [p for p in [final.parent, *final.parent.parents] if not p.exists()]  # removed again on failure
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    backup = None
    try:
        yield tmp
        if keep is not None and final.is_dir():
            _carry(final, tmp, keep)
        _finish_tree(tmp)
        os.chmod(tmp, 0o777 & ~_UMASK)
        with _interrupts_deferred():
            if not final.exists():
                os.rename(tmp, final)
            else:
                try:
                    _exchange(tmp, final)  # tmp now holds the old directory, removed below
                except OSError:
                    # No RENAME_EXCHANGE (another OS, an old kernel, some filesystems): two renames,
                    # and the old directory is put back if the second one does not happen.
                    backup = tmp.with_suffix(".old")
                    os.rename(final, backup)
                    os.rename(tmp, final)
    finally:
        with _interrupts_deferred():
            if backup is not None and backup.exists():
                if not final.exists():
                    os.rename(backup, final)
                else:
                    shutil.rmtree(backup, ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)
            if not final.exists():
                for p in made:
                    with contextlib.suppress(OSError):
                        p.rmdir()


@contextlib.contextmanager
def held_lock(final: Path):
    """An exclusive file lock named after `final` (`.NAME.lock` beside it), held for the block: one
    process at a time builds `final`, and the others wait for it. An flock is released by the kernel when
    its process dies, so an interrupted build never leaves the lock held."""
    final = Path(final)
    lock = final.with_name(f".{final.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def shared_dir(final: Path, build: Callable[[], object]) -> Path:
    """final, a directory that several processes may need at once (a cached GGUF import, a test
    artefact). If it is absent, build() makes it whole or not at all (through atomic_dir) under
    held_lock: a second process waits for the first one's build and reuses it instead of building it
    again."""
    final = Path(final)
    if not final.exists():
        with held_lock(final):
            if not final.exists():  # the process that held the lock before may have built it
                build()
    return final
