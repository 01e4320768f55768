"""ExecuTorch's decode attention (llama::custom_sdpa) timed on its own, at chosen context lengths.

    python -m benchmarks.tools.sdpa_alone [--heads 9 --kv-heads 3 --head-dim 64] [--layers 30]
        [--context 64,256,1024,2000] [--threads 1,2]

Builds small .pte files that hold only what a decode step's attention touches: --layers pairs of fp32
K/V caches of max_seq_len 2048 and one custom_sdpa call per layer on a single query position, as
ptekit's exported model calls it. Three variants, each at every thread count and context length:
- `alone`: the attention calls back to back, nothing delegated;
- `with XNNPACK`: a small XNNPACK-delegated linear layer between consecutive attention calls, as the
  model's projections sit between them (same attention work, plus the delegate's calls);
- `grouped`: the query heads that share a KV head passed as that KV head's rows (one call reads each KV
  head once instead of once per query head; exact for a single query position).
Prints microseconds per attention call (median of 5 timings of 20 forward calls each).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MAX_SEQ_LEN = 2048


class DecodeAttention(torch.nn.Module):
    def __init__(self, layers: int, heads: int, kv_heads: int, head_dim: int, grouped: bool, linear: bool):
        super().__init__()
        self.layers, self.heads, self.kv_heads, self.head_dim = layers, heads, kv_heads, head_dim
        self.grouped = grouped
        for i in range(layers):
            self.register_buffer(f"k{i}", torch.randn(1, MAX_SEQ_LEN, kv_heads, head_dim))
            self.register_buffer(f"v{i}", torch.randn(1, MAX_SEQ_LEN, kv_heads, head_dim))
        dim = heads * head_dim
        self.proj = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)) if linear else None

    def forward(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        start = pos[0].item()
        torch._check(start >= 0)
        torch._check(start + 1 <= MAX_SEQ_LEN)
        reps = self.heads // self.kv_heads
        for i in range(self.layers):
            k, v = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            if self.grouped:
                # [1, 1, Hkv * reps, D] -> [1, reps, Hkv, D]: the reps rows of a KV head all see the
                # same start + 1 keys when the causal mask is off and the start moves back reps - 1.
                qg = q.view(1, self.kv_heads, reps, self.head_dim).transpose(1, 2).contiguous()
                y = torch.ops.llama.custom_sdpa(qg, k, v, start + 1 - reps, None, 0, False)
                y = y.transpose(1, 2).reshape(1, 1, self.heads, self.head_dim)
            else:
                y = torch.ops.llama.custom_sdpa(q, k, v, start, None, 0, True)
            if self.proj is not None:
                y = self.proj[i](y.reshape(1, 1, -1)).view(1, 1, self.heads, self.head_dim)
            q = y
        return q


def build(module: DecodeAttention, path: Path, delegate: bool) -> None:
    from executorch.exir import to_edge, to_edge_transform_and_lower

    q = torch.randn(1, 1, module.heads, module.head_dim)
    ep = torch.export.export(module, (q, torch.tensor([module.heads])))
    if delegate:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    else:
        edge = to_edge(ep)
    path.write_bytes(edge.to_executorch().buffer)


def time_calls(pte, q: torch.Tensor, context: int, layers: int) -> float:
    pos = torch.tensor([context - 1])
    for _ in range(3):
        pte.forward((q, pos))
    timings = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            pte.forward((q, pos))
        timings.append((time.perf_counter() - t) / 20 / layers * 1e6)
    return statistics.median(timings)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=9, help="query heads (default 9: SmolLM2-135M; Llama 3.2 1B: 32)")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads (default 3: SmolLM2-135M; Llama 3.2 1B: 8)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30, help="attention calls per forward (default 30: SmolLM2-135M)")
    ap.add_argument("--context", default="64,256,1024,2000", help="keys attended to, comma-separated")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    a = ap.parse_args(argv)

    from exporter.lower import load_executorch_ops

    load_executorch_ops()
    from executorch.extension.pybindings import portable_lib

    torch.manual_seed(0)
    variants = {"alone": (False, False), "with XNNPACK": (False, True), "grouped": (True, False)}
    contexts = [int(c) for c in a.context.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    q = torch.randn(1, 1, a.heads, a.head_dim)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name, (grouped, linear) in variants.items():
            module = DecodeAttention(a.layers, a.heads, a.kv_heads, a.head_dim, grouped, linear)
            files[name] = Path(tmp) / f"{name.replace(' ', '_')}.pte"
            build(module, files[name], delegate=linear)
        for n in threads:
            portable_lib._unsafe_reset_threadpool(n)
            ptes = {name: portable_lib._load_for_executorch(str(f)) for name, f in files.items()}
            for c in contexts:
                rows.append((n, c, {name: time_calls(p, q, c, a.layers) for name, p in ptes.items()}))
                print(f"threads {n}, context {c}: done", file=sys.stderr, flush=True)

    print(f"custom_sdpa, {a.heads} query heads, {a.kv_heads} KV heads, head dim {a.head_dim}, "
          f"{a.layers} layers, one query position; microseconds per attention call")
    print("| threads | context | " + " | ".join(variants) + " |")
    print("| --: | --: |" + " --: |" * len(variants))
    for n, c, per in rows:
        print(f"| {n} | {c} | " + " | ".join(f"{per[v]:.1f}" for v in variants) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
