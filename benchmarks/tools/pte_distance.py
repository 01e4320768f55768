"""How far one .pte's next-token distributions are from another's on the same text, window by window.

`ptekit eval` measures a file against the BF16 model. This measures what one export option costs on its
own: the same weights lowered two ways (e.g. `--kv-cache fp32` against `--kv-cache int8`), KL(A || B)
and top-1 agreement per window of the text, with standard errors over windows, and each file's
perplexity. Both files need forward_all_logits (`ptekit export --eval-method`) and the same tokenizer.

    python -m benchmarks.tools.pte_distance out/ptq/model.pte out/ptq-kv8/model.pte [--data python-docs] [--max-tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path, help="the reference .pte")
    ap.add_argument("b", type=Path, help="the .pte measured against it")
    ap.add_argument("--data", default="wikitext2", help="as `ptekit eval --data`")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32768)
    a = ap.parse_args()

    from exporter.evaluate import PteLogits, make_windows, mean_se, read_text, resolve_data, window_metrics
    from exporter.generate import tokenizer_beside
    from exporter.lower import load_executorch_ops
    from exporter.runtime import PteModel
    from exporter.tokenizer import Tokenizer

    load_executorch_ops()
    data = resolve_data(a.data)
    tok = Tokenizer(tokenizer_beside(a.a))
    windows = make_windows(tok.encode(read_text(data)), a.seq_len, a.max_tokens, data)
    files = [PteLogits(PteModel(p)) for p in (a.a, a.b)]
    for f in files:
        f.check_window(a.seq_len)
    t0 = time.perf_counter()
    per = {k: [] for k in ("nll_a", "nll_b", "kl", "top1")}
    for w in windows:
        la, lb = (f(w[None]) for f in files)
        m = window_metrics(la, lb, w[None])  # la plays the reference: KL(A || B)
        for k, src in (("nll_a", "ref_nll"), ("nll_b", "nll"), ("kl", "kl"), ("top1", "top1")):
            per[k].append(float(m[src][0]))
    import torch

    out = {k: mean_se(torch.tensor(v)) for k, v in per.items()}
    record = {"a": str(a.a), "b": str(a.b), "data": str(data), "windows": len(windows), "seq_len": a.seq_len,
              "ppl_a": math.exp(out["nll_a"]["mean"]), "ppl_b": math.exp(out["nll_b"]["mean"]),
              "nll_delta": mean_se(torch.tensor(per["nll_b"]) - torch.tensor(per["nll_a"])),
              "kl_a_b": out["kl"], "top1_agreement": out["top1"], "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{a.b} against {a.a} on {data.name}, {len(windows)} windows of {a.seq_len}: "
          f"KL {out['kl']['mean']:.5f} ± {out['kl']['se']:.5f}, top-1 {out['top1']['mean']:.4f} ± {out['top1']['se']:.4f}, "
          f"PPL {record['ppl_a']:.3f} -> {record['ppl_b']:.3f} (ΔNLL {record['nll_delta']['mean']:+.4f} ± "
          f"{record['nll_delta']['se']:.4f})")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    from exporter.errors import PtekitError

    try:
        main()
    except PtekitError as e:
        raise SystemExit(f"error: {e}") from None
