"""ptekit export against ExecuTorch's export_llama, side by side in one run on one checkpoint.

Wall time of each export (as whole processes), the two .pte sizes, and prefill/decode tokens/s of
both files through the same runtime (ExecuTorch's pybindings on this machine, greedy, a 64-token
prompt of real WikiText-2 text, 128 decoded tokens, by benchmarks.pte_speed: the two files' steps
alternating, median of N rounds after one warm-up in each of the two load orders).

    python -m benchmarks.tools.export_vs_export_llama [--checkpoint smollm2-135m] [--out out/vs-export-llama]
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


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of a whole child process."""
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)


def speeds(pte_paths: list[Path], gen: int, rounds: int) -> list[dict]:
    """Prefill and decode speed of each file after a 64-token prompt of WikiText-2 test text, by
    benchmarks.pte_speed: the files taking turns step by step, each file loaded first in one of its fresh
    processes."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "speed.json"
        labels = [f"file{i}" for i in range(len(pte_paths))]
        proc = subprocess.run([sys.executable, "-m", "benchmarks.pte_speed", *map(str, pte_paths), "--labels", ",".join(labels),
                               "--context", "64", "--gen", str(gen), "--rounds", str(rounds), "--json", str(out)],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit("benchmarks.pte_speed failed; its error is above")
        per = json.loads(out.read_text())["results"]["64"]
    return [{"prefill_tok_s": round(per[k]["prefill"]["median"], 1), "decode_tok_s": round(per[k]["decode"]["median"], 1),
             "prefill_all": per[k]["prefill"]["all"], "decode_all": per[k]["decode"]["all"]} for k in labels]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="smollm2-135m")
    ap.add_argument("--out", type=Path, default=Path("out/vs-export-llama"))
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--export-llama-result", type=Path, default=None,
                    help="reuse a finished export_llama run (OUT/export_llama/peer.json, or the JSON that "
                         "benchmarks.export_llama_peer prints) instead of exporting again")
    a = ap.parse_args()
    from benchmarks.export_llama_peer import export_llama
    from exporter.atomic import write_text

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    ours_dir = a.out / "ptekit"
    ours_cmd = [sys.executable, "-m", "exporter.cli", "export", a.checkpoint, "-o", str(ours_dir), "--method", "ptq",
                "--max-seq-len", str(a.max_seq_len), "--quiet"]
    ours_s, ours_cpu = timed(ours_cmd)
    man = json.loads((ours_dir / "manifest.json").read_text())
    if a.export_llama_result:
        peer = json.loads(a.export_llama_result.read_text())
    else:
        peer = export_llama(a.checkpoint, a.out / "export_llama", a.max_seq_len, man["lowering"]["bos_id"],
                            man["lowering"]["eos_ids"])
        # Kept so a rerun can take --export-llama-result instead of another quarter of an hour.
        write_text(a.out / "export_llama" / "peer.json", json.dumps(peer, indent=2))
    ours_speed, peer_speed = speeds([ours_dir / "model.pte", Path(peer["pte"])], a.gen, a.runs)
    result = {
        "checkpoint": a.checkpoint, "max_seq_len": a.max_seq_len,
        "ptekit": {"export_s": round(ours_s, 1), "export_cpu_s": round(ours_cpu, 1), "bytes": (ours_dir / "model.pte").stat().st_size,
                   "command": " ".join(ours_cmd[2:]), **ours_speed},
        "export_llama": {"export_s": peer["seconds"], "export_cpu_s": peer.get("cpu_seconds"), "bytes": peer["bytes"], "command": peer["command"],
                         **peer_speed},
    }
    p, e = result["ptekit"], result["export_llama"]
    result["ratios"] = {"export_time_speedup": round(e["export_s"] / p["export_s"], 2),
                        "export_cpu_speedup": round(e["export_cpu_s"] / p["export_cpu_s"], 2) if e["export_cpu_s"] else None,
                        "size": round(p["bytes"] / e["bytes"], 3),
                        "decode": round(p["decode_tok_s"] / e["decode_tok_s"], 3),
                        "prefill": round(p["prefill_tok_s"] / e["prefill_tok_s"], 3)}
    (a.out / "result.json").write_text(json.dumps(result, indent=2))
    print(f"{'':14s}{'export s':>10s}{'cpu s':>8s}{'MB':>9s}{'prefill tok/s':>15s}{'decode tok/s':>14s}")
    for name in ("ptekit", "export_llama"):
        r = result[name]
        print(f"{name:14s}{r['export_s']:>10.1f}{r['export_cpu_s'] or 0:>8.1f}{r['bytes'] / 1e6:>9.1f}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>14.1f}")
    print(json.dumps(result["ratios"]))


if __name__ == "__main__":
    main()
