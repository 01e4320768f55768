"""ExecuTorch's decode attention (llama::custom_sdpa) timed on its own, at chosen context lengths.

    python -m benchmarks.tools.sdpa_alone [--heads 9 --kv-heads 3 --head-dim 64] [--layers 30]
        [--context 64,256,1024,2000] [--threads 1,2] [--variants alone,with-xnnpack,...]

Builds small .pte files that hold only what a decode step's attention touches: --layers pairs of fp32
K/V caches of max_seq_len 2048 and one custom_sdpa call per layer on a single query position, as
ptekit's exported model calls it, with one of these between consecutive calls (same attention work):
- `alone`: nothing; the attention calls back to back, nothing delegated;
- `with-xnnpack`: an fp32 linear layer over the whole attention output ([1, H·D] by [H·D, H·D]);
- `head-swap`: an fp32 linear over each head's row ([H, D] by [D, D]), as RoPE's pair swap was written
  before commit 9355ede;
- `pair-swap`: an fp32 linear over each pair ([H·D/2, 2] by [2, 2]), as RoPE's pair swap is written now;
- `head-then-pair`: `head-swap`'s linear, then `pair-swap`'s (as in a qlora file, whose fp32 adapters run
  before RoPE);
- `4-bit`: the scheme's 4-bit linear over the whole output (XNNPACK's dynamically quantized GEMM);
- `grouped`: no linear; the query heads that share a KV head passed as that KV head's rows (one call
  reads each KV head once instead of once per query head; exact for a single query position).
Every variant and thread count runs in a process of its own: on x86 an XNNPACK kernel can leave the
thread pool's worker in a state that slows the attention kernel until another kernel clears it, so a
file run after another would inherit it (docs/decode-profile.md). Prints microseconds per attention
call (median of 5 timings of 20 forward calls each).

--read-mb N times each forward on its own (median of 200) after reading N MB of other memory, as a model's
weights pass through the caches between two layers' attention calls (about 2 MB a layer in SmolLM2-135M);
with --layers 1 that is the cost of one attention call whose code and K/V rows were pushed out of the
caches. The time includes the Python call around the forward: compare it with --read-mb 0 (no read).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_SEQ_LEN = 2048
VARIANTS = ("alone", "with-xnnpack", "head-swap", "pair-swap", "head-then-pair", "4-bit", "grouped")


def decode_attention(variant: str, layers: int, heads: int, kv_heads: int, head_dim: int):
    import torch

    class DecodeAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i in range(layers):
                self.register_buffer(f"k{i}", torch.randn(1, MAX_SEQ_LEN, kv_heads, head_dim))
                self.register_buffer(f"v{i}", torch.randn(1, MAX_SEQ_LEN, kv_heads, head_dim))
            # The width of each linear between consecutive attention calls (all square, applied to the
            # attention output's rows of that width).
            dim = heads * head_dim
            widths = {"with-xnnpack": [dim], "4-bit": [dim], "head-swap": [head_dim], "pair-swap": [2],
                      "head-then-pair": [head_dim, 2]}.get(variant, [])
            self.stages = torch.nn.ModuleList(
                torch.nn.ModuleList(torch.nn.Linear(w, w, bias=False) for _ in range(layers)) for w in widths)
            if variant == "4-bit":
                from torchao.quantization import quantize_

                from quant.scheme import block_linear_config

                quantize_(self.stages, block_linear_config())

        def forward(self, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            start = pos[0].item()
            torch._check(start >= 0)
            torch._check(start + 1 <= MAX_SEQ_LEN)
            reps = heads // kv_heads
            for i in range(layers):
                k, v = getattr(self, f"k{i}"), getattr(self, f"v{i}")
                if variant == "grouped":
                    # [1, 1, Hkv * reps, D] -> [1, reps, Hkv, D]: the reps rows of a KV head all see the
                    # same start + 1 keys when the causal mask is off and the start moves back reps - 1.
                    qg = q.view(1, kv_heads, reps, head_dim).transpose(1, 2).contiguous()
                    y = torch.ops.llama.custom_sdpa(qg, k, v, start + 1 - reps, None, 0, False)
                    y = y.transpose(1, 2).reshape(1, 1, heads, head_dim)
                else:
                    y = torch.ops.llama.custom_sdpa(q, k, v, start, None, 0, True)
                for stage in self.stages:
                    y = stage[i](y.reshape(1, -1, stage[i].in_features)).view(1, 1, heads, head_dim)
                q = y
            return q

    return DecodeAttention()


def build(variant: str, a, path: Path) -> None:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge, to_edge_transform_and_lower

    from exporter.lower import load_executorch_ops

    load_executorch_ops()
    torch.manual_seed(0)
    module = decode_attention(variant, a.layers, a.heads, a.kv_heads, a.head_dim)
    q = torch.randn(1, 1, a.heads, a.head_dim)
    ep = torch.export.export(module, (q, torch.tensor([a.heads])))
    if len(module.stages):
        edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    else:
        edge = to_edge(ep)
    path.write_bytes(edge.to_executorch().buffer)


def time_file(path: Path, threads: int, contexts: list[int], a) -> dict[int, float]:
    """In this process: microseconds per attention call at each context length."""
    from exporter.openmp import runtime_process

    runtime_process()  # ExecuTorch's kernels at one OpenMP thread, as in ptekit's runtime processes
    import torch

    from exporter.lower import load_executorch_ops

    load_executorch_ops()
    from executorch.extension.pybindings import portable_lib

    from exporter.runtime import set_runtime_threads

    set_runtime_threads(threads)
    pte = portable_lib._load_for_executorch(str(path))
    torch.manual_seed(1)
    q = torch.randn(1, 1, a.heads, a.head_dim)
    # a.read_mb MB of fp32, read (never written: written lines would add their write-back to the next call)
    other = torch.randn(int(a.read_mb * 2**18)) if a.read_mb else None
    out = {}
    for c in contexts:
        args = (q, torch.tensor([c - 1]))
        for _ in range(3):
            pte.forward(args)
        us = _batched_us(pte, args) if a.read_mb is None else _one_by_one_us(pte, args, other)
        out[c] = us / a.layers
    return out


def _batched_us(pte, args) -> float:
    """Microseconds a forward: the median of 5 timings of 20 forwards back to back."""
    timings = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            pte.forward(args)
        timings.append((time.perf_counter() - t) / 20 * 1e6)
    return statistics.median(timings)


def _one_by_one_us(pte, args, other) -> float:
    """Microseconds a forward: the median of 200 forwards each timed on its own, after reading `other`."""
    timings = []
    for _ in range(200):
        if other is not None:
            other.sum()
        t = time.perf_counter()
        pte.forward(args)
        timings.append((time.perf_counter() - t) * 1e6)
    return statistics.median(timings)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=9, help="query heads (default 9: SmolLM2-135M; Llama 3.2 1B: 32)")
    ap.add_argument("--kv-heads", type=int, default=3, help="KV heads (default 3: SmolLM2-135M; Llama 3.2 1B: 8)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=30, help="attention calls per forward (default 30: SmolLM2-135M)")
    ap.add_argument("--context", default="64,256,1024,2000", help="keys attended to, comma-separated")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--read-mb", type=float,
                    help="MB of other memory read before each forward, each forward timed on its own (use --layers 1)")
    ap.add_argument("--time-file", type=Path, help=argparse.SUPPRESS)  # one measurement, in a child process
    a = ap.parse_args(argv)
    contexts = [int(c) for c in a.context.split(",")]
    threads = [int(t) for t in a.threads.split(",")]
    if a.time_file is not None:
        print(json.dumps(time_file(a.time_file, threads[0], contexts, a)))
        return 0
    variants = a.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")

    shape = ["--heads", str(a.heads), "--kv-heads", str(a.kv_heads), "--head-dim", str(a.head_dim),
             "--layers", str(a.layers), "--context", a.context] + ([] if a.read_mb is None else ["--read-mb", str(a.read_mb)])
    per: dict[tuple[int, int], dict[str, float]] = {(n, c): {} for n in threads for c in contexts}
    with tempfile.TemporaryDirectory() as tmp:
        for v in variants:
            path = Path(tmp) / f"{v}.pte"
            build(v, a, path)
            for n in threads:
                run = subprocess.run([sys.executable, "-m", "benchmarks.tools.sdpa_alone", *shape, "--threads", str(n),
                                      "--time-file", str(path)], capture_output=True, text=True, check=True)
                for c, us in json.loads(run.stdout.strip().splitlines()[-1]).items():
                    per[(n, int(c))][v] = us
                print(f"{v}, {n} thread(s): done", file=sys.stderr, flush=True)

    print(f"custom_sdpa, {a.heads} query heads, {a.kv_heads} KV heads, head dim {a.head_dim}, "
          f"{a.layers} layers, one query position; microseconds per attention call, each variant in its own process"
          + ("" if a.read_mb is None else f"; {a.read_mb:g} MB read before each forward, each forward timed on its own"))
    print("| threads | context | " + " | ".join(variants) + " |")
    print("| --: | --: |" + " --: |" * len(variants))
    for (n, c), row in per.items():
        print(f"| {n} | {c} | " + " | ".join(f"{row[v]:.1f}" for v in variants) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
