"""The peer: ExecuTorch's own `export_llama` on the same checkpoint, for side-by-side figures.

export_llama reads Meta's layout (consolidated .pth + params.json) and has no mode for exactly
ptekit's scheme: its closest is `-qmode 8da4w -G 32 -E 8,0`, which also puts the classifier at
4-bit group 32 (ptekit: 8-bit per channel). Everything else (KV cache, custom SDPA, dynamic
shapes, XNNPACK, fp32 activations, the same max_seq_len) is set to match.

    python -m benchmarks.export_llama_peer CHECKPOINT OUT_DIR [--max-seq-len 512] [--kv-cache int8]

`--kv-cache int8` adds export_llama's `--quantize_kv_cache` (int8 per position and head, its quantized
SDPA), the peer of `ptekit export --kv-cache int8`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from exporter.checkpoint import load_checkpoint
from exporter.defaults import resolve_checkpoint_arg
from exporter.lower import KV_CACHES


def write_meta_layout(checkpoint: str, out: Path) -> Path:
    ckpt = load_checkpoint(resolve_checkpoint_arg(checkpoint))
    c = ckpt.config
    sd = dict(ckpt.state_dict)
    if "output.weight" not in sd:  # export_llama has no tied-embedding path for this model class
        sd["output.weight"] = sd["tok_embeddings.weight"]
    out.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in sd.items()}, out / "consolidated.00.pth")
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
              "vocab_size": c.vocab_size, "hidden_dim": c.hidden_dim, "norm_eps": c.norm_eps,
              "rope_theta": c.rope_theta, "use_scaled_rope": c.rope_scaling is not None, "head_dim": c.head_dim}
    (out / "params.json").write_text(json.dumps(params))
    return out


def export_llama(checkpoint: str, out_dir: Path, max_seq_len: int, bos_id: int, eos_ids: list[int],
                 kv_cache: str = "fp32") -> dict:
    out_dir = Path(out_dir)
    meta = write_meta_layout(checkpoint, out_dir / "meta-layout")
    cmd = [sys.executable, "-m", "executorch.examples.models.llama.export_llama",
           "--model", "llama3", "--checkpoint", str(meta / "consolidated.00.pth"), "--params", str(meta / "params.json"),
           "-kv", "--use_sdpa_with_kv_cache", "-X", "--xnnpack-extended-ops", "-d", "fp32",
           "-qmode", "8da4w", "-G", "32", "-E", "8,0",
           "--max_seq_length", str(max_seq_len), "--max_context_length", str(max_seq_len),
           *(["--quantize_kv_cache"] if kv_cache == "int8" else []),
           "--metadata", json.dumps({"get_bos_id": bos_id, "get_eos_ids": eos_ids}),
           # export_llama resolves --output_name against the working directory, not --output-dir.
           "--output-dir", str(out_dir), "--output_name", str(out_dir.resolve() / "export_llama.pte")]
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"export_llama failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    pte = out_dir / "export_llama.pte"
    return {"pte": str(pte), "bytes": pte.stat().st_size, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "command": " ".join(cmd)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--bos-id", type=int, default=1)
    ap.add_argument("--eos-ids", type=int, nargs="+", default=[2])
    ap.add_argument("--kv-cache", choices=KV_CACHES, default="fp32")
    a = ap.parse_args()
    print(json.dumps(export_llama(a.checkpoint, a.out_dir, a.max_seq_len, a.bos_id, a.eos_ids, a.kv_cache), indent=2))


if __name__ == "__main__":
    main()
