"""The memory-bandwidth bound on decode speed, and how close each runtime comes to it.

Decoding one token reads every weight the token touches once (all of them except the embedding
table, of which one row is read) plus the KV cache up to the current position. At batch 1 that
traffic, not arithmetic, sets the limit: tokens/s <= bandwidth / bytes per token.

    python -m benchmarks.roofline        # this machine's copy bandwidth
"""

from __future__ import annotations

import time

import torch


def measure_bandwidth(mib: int = 256, repeats: int = 7) -> dict:
    """Copy bandwidth (bytes read + bytes written per second) of a buffer far larger than the
    caches, with torch's threads, best of `repeats` (a shared machine only ever slows it down)."""
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
