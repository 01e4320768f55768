"""Llama 3.2 1B and 3B: the .pte sizes computed from the exact shape, MB by MB, beside Meta's model card.

Meta's figures (Llama 3.2 model card, "Inference time", Android OnePlus 12): 1B SpinQuant .pte 1083 MiB,
RSS 1921 MiB; 1B QLoRA .pte 1127 MiB, RSS 2255 MiB; 3B SpinQuant .pte 2435 MiB, RSS 3726 MiB. Nothing
here is measured: every number is a parameter count times its storage width (benchmarks/sizes.py), so
it is labelled "computed".

    python -m benchmarks.tools.meta_sizes [llama3.2-1b|llama3.2-3b]
"""

from __future__ import annotations

import argparse

from benchmarks import sizes
from exporter.config import preset
from exporter.memory import kv_cache_bytes

MIB = 2**20
META = {
    "llama3.2-1b": {"spinquant": {"pte_mib": 1083, "rss_mib": 1921}, "qlora": {"pte_mib": 1127, "rss_mib": 2255}},
    "llama3.2-3b": {"spinquant": {"pte_mib": 2435, "rss_mib": 3726}},
}
LORA_RANK = 16  # quant.lora.DEFAULT_RANK, and the rank of Meta's QLoRA release
MAX_SEQ_LEN = 2048


def computed(shape: str = "llama3.2-1b") -> dict:
    c = preset(shape)
    out = {"config": c.to_dict(), "parameters": sizes.parameter_count(c),
           "block_linear_parameters": sizes.block_linear_params(c), "lora_parameters": sizes.lora_params(c, LORA_RANK),
           "kv_cache_bytes_full": kv_cache_bytes(c, MAX_SEQ_LEN)}
    for name, scale_bytes in (("ptekit", 2), ("fp32_group_scales", 4)):
        out[name] = {
            "spinquant": sizes.computed_parts(c, "ptq", MAX_SEQ_LEN, scale_bytes).as_dict(),
            "qlora": sizes.computed_parts(c, "ptq", MAX_SEQ_LEN, scale_bytes, lora_rank=LORA_RANK).as_dict(),
            "bf16": sizes.computed_parts(c, "bf16", MAX_SEQ_LEN).as_dict(),
        }
    return out


def report(shape: str = "llama3.2-1b") -> str:
    r = computed(shape)
    meta = META[shape]
    mib = lambda b: f"{b / MIB:,.1f}"  # noqa: E731
    p, f = r["ptekit"], r["fp32_group_scales"]
    lines = [
        f"{shape}, sizes computed from the shape (not measured):",
        f"  parameters {r['parameters']:,} (tied embedding counted once); block linears {r['block_linear_parameters']:,}; "
        f"LoRA rank {LORA_RANK} on every block linear {r['lora_parameters']:,}",
        "",
        "| part | ptekit spinquant/ptq (MiB) | with 4-byte group scales (MiB) | ptekit qlora (MiB) | bf16 (MiB) |",
        "| :--- | ---: | ---: | ---: | ---: |",
    ]
    for k in ("block_weights", "block_scales", "embedding", "classifier", "norms", "rope", "lora", "total"):
        lines.append(f"| {k} | {mib(p['spinquant'][k])} | {mib(f['spinquant'][k])} | {mib(p['qlora'][k])} | "
                     f"{mib(p['bf16'][k])} |")
    for method, card in meta.items():
        ours, fp32 = p[method]["total"] / MIB, f[method]["total"] / MIB
        lines.append(f"\n{method}: Meta .pte {card['pte_mib']} MiB; computed ptekit {ours:,.1f} MiB "
                     f"({card['pte_mib'] - ours:+.1f} MiB to Meta); computed with 4-byte group scales {fp32:,.1f} MiB "
                     f"({card['pte_mib'] - fp32:+.1f} MiB to Meta, the program itself)")
    kv = r["kv_cache_bytes_full"]
    deleg = p["spinquant"]["block_weights"] + f["spinquant"]["block_scales"] + p["spinquant"]["classifier"]
    lines.append(f"\nRSS parts (computed): KV cache fp32 at {MAX_SEQ_LEN} positions {mib(kv)} MiB; XNNPACK's packed copy of "
                 f"the delegated weights (block linears with 4-byte scales + classifier) {mib(deleg)} MiB; "
                 f"Meta SpinQuant RSS - .pte = {meta['spinquant']['rss_mib'] - meta['spinquant']['pte_mib']} MiB.")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Llama 3.2 1B or 3B: the .pte's sizes computed from the exact shape, "
                                             "part by part, beside the figures of Meta's model card (nothing measured).")
    ap.add_argument("shape", nargs="?", default="llama3.2-1b", choices=sorted(META))
    print(report(ap.parse_args().shape))
