"""Where a .pte's decode time goes, operator by operator, through ExecuTorch's own event tracer.

    python -m benchmarks.tools.profile_decode A.pte [B.pte ...] [--prompt-len 64] [--steps 128] [--threads 2]
    python -m benchmarks.tools.profile_decode A.pte [B.pte ...] --prefill [--prompt-len 64] [--steps 16]

Each file is loaded with ETDump enabled, prefills a prompt of --prompt-len tokens, then decodes
--steps tokens one at a time (greedy), alternating files step by step so that whatever else the
machine does falls on both alike. The ETDump's events of the decode steps (not the prefill) are
summed by name: the XNNPACK delegate's calls, ExecuTorch's own kernels (custom_sdpa,
update_cache, embedding_byte, ...) and the method's overhead outside any operator. Prints per
decoded token the milliseconds in each, and the wall-clock decode rate measured around run_method
(lower than the runner's: the tracer and the Python call cost time per step, alike for every file).

--prefill profiles the prompt instead: after one untimed prefill, each file prefills the same prompt
from position 0 --steps times, the files taking turns, and the events are per prefill.

With several files the profile runs once per load order, each file loaded first in one of them, each in
a fresh process, and each figure is the mean over the orders (benchmarks/load_order.py: the file a
process loads first can run slower). --one-load-order profiles once, in this process, in the order given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks import load_order

EXECUTE = "Method::execute"
CALLS = (EXECUTE, "DELEGATE_CALL", "OPERATOR_CALL")  # the method and its calls, not operators
XNNPACK_OP = re.compile(r"^[A-Z][^:]* \(.*\)")  # "Fully Connected (NC, F32) GEMM", "Add (ND)"; not "llama::..."


class Traced:
    def __init__(self, path: Path):
        from exporter.runtime import PteModel

        self.path = path
        self.pte = PteModel(path, etdump=True)
        self.step_s: list[float] = []

    def forward(self, tokens: list[int], start: int, timed: bool) -> int:
        t0 = time.perf_counter()
        logits = self.pte.forward(tokens, start)
        if timed:
            self.step_s.append(time.perf_counter() - t0)
        return int(logits.argmax())

    def events(self, skip_first: int) -> tuple[dict, int, dict]:
        """Event name -> total ms over the executions after the first `skip_first` (the prefill), how
        many XNNPACK operators one execution runs (each is one event, its times one per execution), and the
        operator call that takes longest ({"name", "ms": its median per execution}): in a language model,
        the classifier's GEMM, whose time the by-kind totals mix with the blocks' GEMMs of the same kind."""
        from executorch.devtools import Inspector

        with tempfile.TemporaryDirectory() as d:
            dump = Path(d) / "etdump.etdp"
            self.pte.write_etdump(dump)
            inspector = Inspector(etdump_path=str(dump))
        totals: dict[str, float] = defaultdict(float)
        xnnpack_ops = 0
        largest = {"name": None, "ms": 0.0}
        for block in inspector.event_blocks:
            for ev in block.events:
                name = re.sub(r" #\d+$", "", ev.name)  # XNNPACK numbers each operator; sum by kind
                xnnpack_ops += XNNPACK_OP.match(name) is not None
                times = list(ev.perf_data.raw)[skip_first:] if ev.perf_data is not None else []
                for ms in times:
                    totals[name] += ms
                median = statistics.median(times) if times and name not in CALLS else 0.0
                if median > largest["ms"]:
                    largest = {"name": name, "ms": round(median, 3)}
        return dict(totals), xnnpack_ops, largest


def fixed_prompt(n: int) -> list[int]:
    """n token ids that exist in every vocabulary (the BOS of most, then spread ids): the same prompt for
    every file, whatever its tokenizer."""
    return [1] + [(7 * i + 13) % 1000 + 100 for i in range(n - 1)]


def profile(paths: list[Path], prompt_len: int, steps: int, prefill: bool = False) -> list[dict]:
    runs = [Traced(p) for p in paths]
    prompt = fixed_prompt(prompt_len)
    nxt = [r.forward(prompt, 0, timed=False) for r in runs]
    for step in range(steps):
        for i, r in enumerate(runs):
            if prefill:  # the same prompt again from position 0: it overwrites the cache rows it wrote
                r.forward(prompt, 0, timed=True)
            else:
                nxt[i] = r.forward([nxt[i]], prompt_len + step, timed=True)
    out = []
    for r in runs:
        totals, xnnpack_ops, largest = r.events(skip_first=1)
        per_token = {k: round(v / steps, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
        execute = per_token.get(EXECUTE)
        # The delegate's own operators nest inside DELEGATE_CALL; these two are the method's top level.
        inside = per_token.get("DELEGATE_CALL", 0) + per_token.get("OPERATOR_CALL", 0)
        tok_s = (prompt_len if prefill else 1) / statistics.median(r.step_s)
        out.append({"pte": str(r.path), "bytes": r.path.stat().st_size, "steps": steps, "prompt_len": prompt_len,
                    "phase": "prefill" if prefill else "decode",
                    f"{'prefill' if prefill else 'decode'}_tok_s_wall": round(tok_s, 2),
                    "xnnpack_operators_per_prefill" if prefill else "xnnpack_operators_per_token": xnnpack_ops,
                    "ms_per_prefill" if prefill else "ms_per_token": per_token,
                    "ms_outside_operators": round(execute - inside, 3) if execute is not None else None,
                    "largest_operator": largest})
    return out


def table(results: list[dict]) -> str:
    phase = results[0]["phase"]
    per, key, ops = (("prefill", "ms_per_prefill", "xnnpack_operators_per_prefill") if phase == "prefill"
                     else ("decoded token", "ms_per_token", "xnnpack_operators_per_token"))
    names: list[str] = []
    for r in results:
        names += [n for n in r[key] if n not in names]
    head = f"| event (ms per {per}) | " + " | ".join(Path(r["pte"]).parent.name + "/" + Path(r["pte"]).name
                                                          for r in results) + " |"
    lines = [head, "| :--- |" + " ---: |" * len(results)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r[key].get(n, 0):.3f}" for r in results) + " |")
    lines.append("| outside any operator (the method's own work) | " + " | ".join(
        f"{r['ms_outside_operators']:.3f}" if r["ms_outside_operators"] is not None else "n/a" for r in results) + " |")
    lines.append(f"| the longest operator call, ms per {per.split()[-1]} | " + " | ".join(
        f"{r['largest_operator']['ms']:.3f} ({r['largest_operator']['name']})" for r in results) + " |")
    lines.append(f"| XNNPACK operators run per {per} | " + " | ".join(
        str(r[ops]) for r in results) + " |")
    lines.append(f"| {phase} tok/s (wall, median step) | " + " | ".join(f"{r[f'{phase}_tok_s_wall']:.1f}"
                                                                         for r in results) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte", nargs="+", type=Path)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="0: every core")
    ap.add_argument("--prefill", action="store_true", help="profile the prompt's prefill instead of decode steps")
    ap.add_argument("--json", type=Path, default=None)
    load_order.add_one_order_flag(ap, "the figures are averaged")
    a = ap.parse_args(argv)
    if len(a.pte) > 1 and not a.one_load_order:
        records = load_order.run_each_order(
            "benchmarks.tools.profile_decode", a.pte, None,
            ["--prompt-len", str(a.prompt_len), "--steps", str(a.steps), "--threads", str(a.threads),
             *(["--prefill"] if a.prefill else [])])
        results = averaged(records, a.pte)
    else:
        results = profile_in_process(a)
        if results is None:
            return 2
    print(table(results))
    if a.json:
        from exporter.atomic import write_text

        write_text(a.json, json.dumps(results, indent=2) + "\n")
    return 0


def averaged(records: list[list[dict]], ptes: list[Path]) -> list[dict]:
    """Per file (in the order given), its profiles from every load order averaged: each event's time, the
    wall-clock rate, the time outside operators and the longest operator call's time are the mean over the
    orders."""
    out = []
    for p in ptes:
        runs = [next(r for r in rec if r["pte"] == str(p)) for rec in records]
        merged = dict(runs[0], load_orders=len(runs))
        for key, value in runs[0].items():
            if key.startswith("ms_per_"):
                events = {n for r in runs for n in r[key]}
                means = {n: round(sum(r[key].get(n, 0.0) for r in runs) / len(runs), 3) for n in events}
                merged[key] = dict(sorted(means.items(), key=lambda kv: -kv[1]))
            elif key.endswith("_tok_s_wall") or (key == "ms_outside_operators" and value is not None):
                vals = [r[key] for r in runs]
                merged[key] = None if None in vals else round(sum(vals) / len(vals), 3)
            elif key == "largest_operator":  # its time averaged; the names of every order's, if they differ
                merged[key] = {"name": " / ".join(sorted({r[key]["name"] for r in runs})),
                               "ms": round(sum(r[key]["ms"] for r in runs) / len(runs), 3)}
        out.append(merged)
    return out


def profile_in_process(a) -> list[dict] | None:
    from exporter import openmp

    openmp.runtime_process()  # before torch loads libgomp
    from exporter.lower import load_executorch_ops

    load_executorch_ops()
    from exporter.runtime import set_runtime_threads

    set_runtime_threads(a.threads or os.cpu_count() or 1)
    from exporter.errors import PtekitError

    try:
        return profile(a.pte, a.prompt_len, a.steps, a.prefill)
    except PtekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
