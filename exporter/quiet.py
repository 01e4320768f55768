"""Keeps the CLI's output to ptekit's own lines: the libraries underneath log a lot that a user
cannot act on (torchao's optional CUDA kernels failing to load on a CPU machine, export-time
deprecation notices)."""

import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("torchao", "torch", "executorch", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
