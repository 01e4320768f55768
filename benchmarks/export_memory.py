"""Peak resident memory of `ptekit export`, stage by stage.

    python -m benchmarks.export_memory llama3.2-1b-random llama3.2-3b-random [--method ptq] [--out DIR]

Each model (a checkpoint path, or one of the random Llama 3.2 shapes, written on first use under
DIR/checkpoints) is exported in a child process of its own. At the start of every stage and
lowering phase the child resets the kernel's peak-RSS counter (VmHWM, through /proc/self/clear_refs)
and at its end reads it, so each row is that stage's own peak, not the peak so far; "end" is the
resident memory when the stage finished, what the next stage starts from. The table has one column
pair per model, in MiB, and the whole export's peak at the bottom.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    # "5" resets VmHWM to the current RSS (Linux 4.0+).
    Path("/proc/self/clear_refs").write_text("5")


class StageMemory:
    """on_phase callback: closes the previous stage's row and opens the next."""

    def __init__(self):
        self.rows: list[dict] = []
        self.name, self.t = None, 0.0

    def __call__(self, name: str | None):
        if self.name is not None:
            self.rows.append({"stage": self.name, "peak_mib": round(_status("VmHWM"), 1),
                              "end_mib": round(_status("VmRSS"), 1), "seconds": round(time.perf_counter() - self.t, 1)})
        self.name, self.t = name, time.perf_counter()
        _reset_peak()


def child(checkpoint: str, method: str, out: Path, max_seq_len: int, options: list[str]) -> dict:
    from exporter import pipeline
    from exporter.quiet import quiet_libraries
    from quant.method import parse_options

    quiet_libraries()
    rec = StageMemory()
    start = round(_status("VmRSS"), 1)
    res = pipeline.export(checkpoint, out, method, max_seq_len=max_seq_len, on_phase=rec,
                          options=parse_options(options) if options else None)
    rec(None)
    return {"checkpoint": checkpoint, "method": method, "start_mib": start, "stages": rec.rows,
            "peak_mib": max(r["peak_mib"] for r in rec.rows), "pte_bytes": res.manifest["pte_bytes"],
            "pte_sha256": res.manifest["pte_sha256"]}


def measure(model: str, a) -> dict:
    from benchmarks.suite import RANDOM_MODELS, random_checkpoint_dir

    ckpt = str(random_checkpoint_dir(a.out / "checkpoints" / model, RANDOM_MODELS[model])) \
        if model in RANDOM_MODELS else model
    name = Path(model).name
    res = a.out / f"{name}-{a.method}.json"
    cmd = [sys.executable, "-m", "benchmarks.export_memory", "--child", ckpt, "--method", a.method,
           "--out", str(a.out / f"{name}-{a.method}"), "--max-seq-len", str(a.max_seq_len), "--json", str(res)]
    for o in a.option or ():
        cmd += ["-O", o]
    print(f"- {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return {"name": name, **json.loads(res.read_text())}


def table(runs: list[dict]) -> str:
    stages = list(dict.fromkeys(r["stage"] for run in runs for r in run["stages"]))
    head = "| stage | " + " | ".join(f"{r['name']} peak | end | s" for r in runs) + " |"
    lines = [head, "| :--- |" + " ---: | ---: | ---: |" * len(runs)]
    for st in stages:
        cells = []
        for run in runs:
            row = next((r for r in run["stages"] if r["stage"] == st), None)
            cells.append(f"{row['peak_mib']:,.0f} | {row['end_mib']:,.0f} | {row['seconds']:,.1f}" if row else " | | ")
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    lines.append("| **whole export (peak)** | " + " | ".join(f"**{r['peak_mib']:,.0f}** | | " for r in runs) + " |")
    lines.append("| .pte size (MiB) | " + " | ".join(f"{r['pte_bytes'] / 2**20:,.1f} | | " for r in runs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.export_memory", description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="checkpoint paths or llama3.2-1b-random / llama3.2-3b-random")
    ap.add_argument("--method", default="ptq")
    ap.add_argument("-O", "--option", action="append", help="a method option KEY=VALUE, as `ptekit export -O`")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=Path("out/export-memory"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        rec = child(a.models[0], a.method, a.out, a.max_seq_len, a.option or [])
        a.json.write_text(json.dumps(rec, indent=2) + "\n")
        return 0
    runs = [measure(m, a) for m in a.models]
    print(f"`ptekit export --method {a.method}`, resident memory per stage (MiB)\n")
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
