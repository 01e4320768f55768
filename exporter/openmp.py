"""OpenMP's thread count while ExecuTorch runs a .pte on this machine.

ExecuTorch's pip runtime links torch's libgomp, and its kernels outside the XNNPACK delegate
(`llama::custom_sdpa` among them) open OpenMP regions of their own while XNNPACK's thread pool holds
the cores. On a 2-core host the two sets of threads contend: with OpenMP at one thread SmolLM2's ptq
file decoded 1.20x as fast after a 64-token prompt and 3.09x as fast at 1,024 positions, where the
attention kernel's time fell from 35.2 to 5.9 ms a token (docs/decode-profile.md). XNNPACK's pool
keeps its threads; only the OpenMP regions inside the other kernels run on the thread that opens them.

Two settings reach them. Regions opened on the calling thread follow torch.set_num_threads, set
around each call into the runtime (one_thread_for_runtime_calls). Regions opened on the runtime's
pool threads follow OMP_NUM_THREADS, which libgomp reads once, when it loads: a process that only
runs .pte files sets it before anything imports torch (runtime_process).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def runtime_process() -> None:
    """For a process whose work is running .pte files (the host runner, `ptekit generate`, the speed
    benchmarks), before torch is imported; torch's own work in such a process sets its threads itself.
    Once torch is loaded the variable would reach nothing but child processes, so then it is left alone."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_NUM_THREADS", "1")


@contextmanager
def torch_threads(n: int):
    """The calling thread's OpenMP (torch's thread count) at n inside the block, as it was after it."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def one_thread_for_runtime_calls():
    """Around a call into ExecuTorch's runtime: the calling thread's OpenMP regions at one thread, then
    torch's thread count as it was (a .pte evaluated beside an eager model keeps the model's threads)."""
    return torch_threads(1)
