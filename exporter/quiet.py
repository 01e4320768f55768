"""Keeps the CLI's output to ptekit's own lines.

The libraries underneath log a lot that a user cannot act on: torchao's optional CUDA kernels failing
to load on a CPU machine, export-time deprecation notices (Python), and the C++ runtime's own lines —
ExecuTorch's `[cpuinfo_utils.cpp:87] Failed to open midr file ...`, the tokenizer's `I tokenizers:
regex.cpp:40] ...` — written straight to file descriptor 2, where no Python setting reaches them.
`ptekit --verbose` keeps all of it.
"""

import faulthandler
import logging
import os
import sys
import warnings
from contextlib import contextmanager

_devnull = None  # set by silence_native_stderr


# The libraries whose Python warnings (deprecations, experimental-API notices) a user of ptekit cannot
# act on, matched against the module that issues the warning; warnings from anywhere else still show.
LIBRARY_MODULES = r"(torch|torchao|executorch)(\..*)?$"


def for_command(verbose: bool) -> None:
    """What a command line (`ptekit`, `python -m benchmarks`) calls first: unless --verbose, the
    libraries' Python logging and warnings and native code's stderr lines are kept from the user."""
    if not verbose:
        quiet_libraries()
        silence_native_stderr()


def quiet_libraries() -> None:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # Importing torch resets its "torch" logger to WARNING, and the command line imports torch only
    # inside a command, after this has run; torch reads the level from TORCH_LOGS on that import.
    os.environ.setdefault("TORCH_LOGS", "-torch")
    warnings.filterwarnings("ignore", module=LIBRARY_MODULES)
    for name in ("torchao", "torch", "executorch", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def silence_native_stderr() -> None:
    """Point file descriptor 2 at /dev/null for native code; Python's sys.stderr (ptekit's messages,
    progress bars, tracebacks) keeps writing to the real stderr through a duplicate of it. A crash
    in native code still prints its Python stack there (faulthandler)."""
    global _devnull
    sys.stderr.flush()
    _devnull = open(os.devnull, "w")
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = os.fdopen(real, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    faulthandler.enable(file=sys.stderr)


@contextmanager
def native_calls():
    """Around calls into ExecuTorch's Python bindings: while one runs, they copy C++'s std::cout and
    std::cerr into Python's sys.stdout and sys.stderr (the `[cpuinfo_utils.cpp:87] ...` lines), past the
    descriptor-level silence above. Those two point at /dev/null for the call, unless --verbose."""
    if _devnull is None:
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = _devnull
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
