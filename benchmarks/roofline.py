"""The memory-bandwidth bound on decode speed, and how close each runtime comes to it.

Decoding one token reads every weight the token touches once (all of them except the embedding
table, of which one row is read) plus the KV cache up to the current position. At batch 1 that
traffic, not arithmetic, sets the limit: tokens/s <= bandwidth / bytes per token.

    python -m benchmarks.roofline        # this machine's copy bandwidth
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from exporter.openmp import torch_threads

# Bytes per element of the ExecuTorch schema's scalar types a KV cache can hold.
_ELEMENT_BYTES = {"CHAR": 1, "BYTE": 1, "HALF": 2, "BFLOAT16": 2, "FLOAT": 4, "DOUBLE": 8}


def measure_bandwidth(mib: int = 256, repeats: int = 7) -> dict:
    """Copy bandwidth (bytes read + bytes written per second) of a buffer far larger than the
    caches, on every CPU the OS reports (a .pte runner process keeps torch at one OpenMP thread:
    exporter.openmp), best of `repeats` (a shared machine only ever slows it down)."""
    with torch_threads(os.cpu_count() or 1):
        return _copy_bandwidth(mib, repeats)


def _copy_bandwidth(mib: int, repeats: int) -> dict:
    n = mib * 2**20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return {"bytes_per_s": 2 * n / best, "gb_per_s": round(2 * n / best / 1e9, 2), "buffer_mib": mib,
            "threads": torch.get_num_threads(), "method": f"torch copy_ of {mib} MiB, best of {repeats}, read+write"}


def bytes_per_token(weight_file_bytes: int, embedding_bytes: int, kv_bytes_per_position: int, position: float) -> int:
    """Weights touched per decoded token plus the KV cache read at `position` (the mean position of
    the decoded tokens)."""
    return int(weight_file_bytes - embedding_bytes + kv_bytes_per_position * position)


def kv_bytes_per_position(pte: Path, n_kv_heads: int) -> int:
    """Bytes one position of the file's KV cache holds, read from the program itself, so that it holds for
    a file without a ptekit manifest (export_llama's) and for every cache layout. ExecuTorch plans the
    cache as mutable buffers of shape [1, max_context_len, n_kv_heads, ...]: K and V of each layer, and
    for an int8 cache their scales and zero points beside them. Activations never span max_context_len
    positions (a prompt holds at most max_context_len - 1), so the shape picks out the cache."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    from exporter.errors import PtekitError

    program = deserialize_pte_binary(pte.read_bytes()).program
    plans = {plan.name: plan for plan in program.execution_plan}
    meta = plans.get("get_max_context_len") or plans.get("get_max_seq_len")
    if "forward" not in plans or meta is None:
        raise PtekitError(f"{pte}: not an LLM .pte (no forward method or no get_max_context_len); pass one ptekit "
                          "or export_llama wrote")
    positions = meta.values[0].val.int_val
    total = 0
    for value in plans["forward"].values:
        t = value.val
        if type(t).__name__ != "Tensor" or t.allocation_info is None or len(t.sizes) != 4:
            continue
        if t.sizes[0] == 1 and t.sizes[1] == positions and t.sizes[2] == n_kv_heads:
            total += _ELEMENT_BYTES[t.scalar_type.name] * t.sizes[2] * t.sizes[3]
    if total == 0:
        raise PtekitError(f"{pte}: no KV cache of {positions} positions and {n_kv_heads} KV heads in its forward "
                          "method; --roofline needs files of the first file's model")
    return total


def bound(bytes_per_token_: int, bandwidth_bytes_per_s: float) -> float:
    """The most tokens/s the memory system allows."""
    return bandwidth_bytes_per_s / bytes_per_token_


def entry(name: str, decode_tok_s: float | None, bpt: int, bandwidth: float) -> dict:
    limit = bound(bpt, bandwidth)
    return {"name": name, "bytes_per_token": bpt, "bound_tok_s": round(limit, 1), "decode_tok_s": decode_tok_s,
            "share_of_bound": None if decode_tok_s is None else round(decode_tok_s / limit, 3),
            "achieved_gb_per_s": None if decode_tok_s is None else round(decode_tok_s * bpt / 1e9, 2)}


if __name__ == "__main__":
    bw = measure_bandwidth()
    print(f"memory bandwidth: {bw['gb_per_s']} GB/s ({bw['method']}, {bw['threads']} threads)")
