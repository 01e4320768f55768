"""quant.fake_quant against torchao's QAT fake quantizers, timed on one of SmolLM2-135M's FFN linears.

    python -m benchmarks.tools.fake_quant_speed [--tokens 4096] [--in-features 576] [--out-features 1536]

For one training batch (8 x 512 tokens by default) through one linear, forward and backward, median of
20 after 3 warm-ups: the fake quantization alone (the scheme's int4 group-32 symmetric weight and int8
per-token asymmetric activation), then the whole step with the fp32 matmul. torchao's side is
torchao.quantization.qat's IntxFakeQuantizer with the same bit widths, groups and symmetry (its group
scales stay fp32, ptekit's are rounded to bf16 as the .pte stores them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def median_ms(fn, n: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn().backward()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8 * 512)
    ap.add_argument("--in-features", type=int, default=576)
    ap.add_argument("--out-features", type=int, default=1536)
    args = ap.parse_args(argv)

    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    from quant import fake_quant, scheme

    torch.manual_seed(0)
    w = torch.randn(args.out_features, args.in_features, requires_grad=True)
    x = torch.randn(args.tokens, args.in_features, requires_grad=True)
    ao_weight = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int4, group_size=scheme.GROUP_SIZE, is_symmetric=True))
    ao_act = IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))
    sides = {"ptekit (quant.fake_quant)": (fake_quant.block_weight, fake_quant.act), "torchao QAT": (ao_weight, ao_act)}

    print(f"{args.tokens} tokens x [{args.out_features}, {args.in_features}] linear, fp32, "
          f"{torch.get_num_threads()} threads, median ms (forward + backward)")
    print("| fake quantizers | fake quantization alone | step with the matmul |")
    print("| :-- | --: | --: |")
    for name, (fq_w, fq_a) in sides.items():
        alone = median_ms(lambda fq_w=fq_w, fq_a=fq_a: fq_a(x).sum() + fq_w(w).sum())
        step = median_ms(lambda fq_w=fq_w, fq_a=fq_a: (fq_a(x) @ fq_w(w).t()).sum())
        print(f"| {name} | {alone:.2f} | {step:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
