"""Prefill and decode speed of several .pte files side by side, on this host, in one run.

Every round runs every file, interleaved so that a slow spell of a shared machine falls on every file
alike: the prompts are prefilled one file after the other, then the files' decode steps alternate,
one token each in turn (A B A B ..., and B A B A ... in the next round). A file's run at context C:
- prefill: one forward call on a C-token prompt of WikiText-2 test text (tokens/s);
- decode: `--gen` greedy tokens after it, one forward call each, each timed on its own (tokens/s at
  C..C+gen of context).
The first round is a warm-up (XNNPACK packs its weights on the first call) and is not counted; the
table gives the median over the other rounds [min-max] and each file's ratio to the first file.

With several files the whole measurement runs once per load order, each file loaded first in one of
them, each in a fresh process, and the rounds of all of them are pooled (benchmarks/load_order.py: the
file a process loads first can run slower). --one-load-order measures once, in this process, in the
order given.

    python -m benchmarks.pte_speed out/ptq/model.pte out/qlora/model.pte --labels ptq,qlora
    python -m benchmarks.pte_speed A.pte B.pte --context 64,256,1024,2000 --gen 32 [--threads 1] [--roofline]

--roofline also measures this machine's copy bandwidth and sets each file's decode against the bound it
gives (benchmarks/roofline.py): the bytes a decoded token reads, all of the file but the embedding table
plus the KV cache up to the mean decoded position, over the bandwidth. Each file's cache bytes per
position are read from its own program (benchmarks/roofline.kv_bytes_per_position), so an int8 cache
counts as int8 in export_llama's file too. The shape comes from the first file's export manifest
(every file must be of that model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import load_order


def prompt_ids(pte: Path, n: int, vocab: int) -> list[int]:
    """n tokens of WikiText-2 test text in the file's own tokenizer (its export directory's), else
    a fixed spread of ids: speed does not depend on which tokens they are."""
    from exporter.manifest import read_manifest

    man = read_manifest(pte.parent)
    if man and man.get("tokenizer"):
        from exporter.defaults import WIKITEXT2_TEST, data_file
        from exporter.errors import PtekitError
        from exporter.tokenizer import Tokenizer

        try:
            text = data_file(WIKITEXT2_TEST).read_text()
        except PtekitError:  # no data directory: the fixed ids serve as well
            text = ""
        ids = Tokenizer(pte.parent / man["tokenizer"]).encode(text[: 12 * n + 4096]) if text else []
        if len(ids) >= n:
            return ids[:n]
    return [(7919 * i + 13) % vocab for i in range(n)]


def run_round(models: list, order: list[int], prompt: list[int], gen: int) -> list[tuple[float, float]]:
    """(prefill tokens/s, decode tokens/s) per model of one round: the prompts one model after the other
    in `order`, then `gen` greedy steps with the models taking turns in `order`."""
    prefill_s, decode_s, logits = [0.0] * len(models), [0.0] * len(models), [None] * len(models)
    for i in order:
        t0 = time.perf_counter()
        logits[i] = models[i].forward(prompt, 0)
        prefill_s[i] = time.perf_counter() - t0
    for step in range(gen):
        for i in order:
            token = int(logits[i].argmax())
            t0 = time.perf_counter()
            logits[i] = models[i].forward([token], len(prompt) + step)
            decode_s[i] += time.perf_counter() - t0
    return [(len(prompt) / p, gen / d) for p, d in zip(prefill_s, decode_s, strict=True)]


def measure(models: list, prompt: list[int], gen: int, rounds: int, on_round=lambda r: None) -> list[dict]:
    """Per model, {"prefill": [...], "decode": [...]} tokens/s over `rounds` rounds after a warm-up round,
    the order of the models reversed from one round to the next."""
    runs = [{"prefill": [], "decode": []} for _ in models]
    for r in range(rounds + 1):
        order = list(range(len(models)))[:: -1 if r % 2 else 1]
        for i, (prefill, decode) in enumerate(run_round(models, order, prompt, gen)):
            if r:  # round 0 warms up (XNNPACK packs its weights on the first call)
                runs[i]["prefill"].append(prefill)
                runs[i]["decode"].append(decode)
        on_round(r)
    return runs


def spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 2), "min": round(min(xs), 2), "max": round(max(xs), 2),
            "all": [round(x, 2) for x in xs]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte", nargs="+", type=Path, help=".pte files; ratios are to the first")
    ap.add_argument("--labels", default=None, help="comma-separated names for the files (default: their folders)")
    ap.add_argument("--context", default="64", help="comma-separated prompt lengths (default 64)")
    ap.add_argument("--gen", type=int, default=64, help="greedy tokens decoded after each prompt (default 64)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="counted rounds after the warm-up, in each load order (default 5)")
    ap.add_argument("--threads", type=int, default=0, help="ExecuTorch's thread pool size (default: the runtime's own choice)")
    ap.add_argument("--prompt-from", type=Path, default=None,
                    help="the .pte whose export directory's tokenizer writes the prompts (default: the first file)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run to this file")
    ap.add_argument("--roofline", action="store_true", help="also each file's decode as a share of the memory-bandwidth bound")
    load_order.add_one_order_flag(ap, "the rounds are pooled")
    a = ap.parse_args(argv)

    labels = a.labels.split(",") if a.labels else [p.parent.name or p.stem for p in a.pte]
    if len(labels) != len(a.pte):
        raise SystemExit(f"--labels names {len(labels)} files; {len(a.pte)} were given")
    contexts = [int(c) for c in a.context.split(",")]
    if a.one_load_order or len(a.pte) == 1:
        results = measure_in_process(a.pte, labels, contexts, a.gen, a.rounds, a.threads, a.prompt_from or a.pte[0])
        orders = [labels]
    else:
        records = load_order.run_each_order(
            "benchmarks.pte_speed", a.pte, labels,
            ["--context", a.context, "--gen", str(a.gen), "--rounds", str(a.rounds), "--threads", str(a.threads),
             "--prompt-from", str(a.prompt_from or a.pte[0])])
        results = pooled(records, labels, contexts)
        orders = [r["load_orders"][0] for r in records]

    print(f"{len(a.pte)} files, {a.rounds} rounds after a warm-up in each of {len(orders)} load order(s), "
          f"{a.gen} decoded tokens (steps alternating), median [min-max] tokens/s")
    print(f"| context | file | prefill | decode | prefill vs {labels[0]} | decode vs {labels[0]} |")
    print("| --: | :-- | --: | --: | --: | --: |")
    for c, per in results.items():
        base = per[labels[0]]
        for label in labels:
            p, d = per[label]["prefill"], per[label]["decode"]
            print(f"| {c} | {label} | {p['median']:.1f} [{p['min']:.1f}-{p['max']:.1f}] | "
                  f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}] | "
                  f"{p['median'] / base['prefill']['median']:.3f}x | {d['median'] / base['decode']['median']:.3f}x |")
    record = {"files": {lab: str(p) for lab, p in zip(labels, a.pte, strict=True)}, "gen": a.gen, "rounds": a.rounds,
              "load_orders": orders, "results": results}
    if a.roofline:
        record["roofline"] = roofline(a.pte, labels, results, a.gen)
    if a.json:
        from exporter.atomic import write_text

        write_text(a.json, json.dumps(record, indent=2))
    return 0


def pooled(records: list[dict], labels: list[str], contexts: list[int]) -> dict:
    """{context: {label: {"prefill"|"decode": spread}}} over the rounds of every load order's record."""
    return {c: {label: {k: spread([x for r in records for x in r["results"][str(c)][label][k]["all"]])
                        for k in ("prefill", "decode")} for label in labels} for c in contexts}


def measure_in_process(ptes: list[Path], labels: list[str], contexts: list[int], gen: int, rounds: int,
                       threads: int, prompt_from: Path) -> dict:
    """The files loaded in the order given, in this process: {context: {label: {"prefill"|"decode": spread}}}.
    threads: ExecuTorch's thread pool size (0: the runtime's own); prompt_from: the .pte whose tokenizer
    writes the prompts."""
    from exporter import openmp

    openmp.runtime_process()  # before torch loads libgomp
    from exporter.errors import PtekitError
    from exporter.runtime import PteModel, set_runtime_threads

    try:
        models = [PteModel(p) for p in ptes]
        if threads:
            set_runtime_threads(threads)
    except PtekitError as e:
        raise SystemExit(str(e)) from None
    for p, m in zip(ptes, models, strict=True):
        limit = int(m.meta("get_max_seq_len", 2048))
        if max(contexts) + gen > limit:
            raise SystemExit(f"{p}: holds {limit} positions; --context {max(contexts)} + --gen {gen} does not fit")
    vocab = int(models[0].meta("get_vocab_size", 32000))

    results = {}
    for c in contexts:
        prompt = prompt_ids(prompt_from, c, vocab)
        runs = measure(models, prompt, gen, rounds,
                       lambda r, c=c: print(f"context {c}: round {r}/{rounds} done", file=sys.stderr, flush=True))
        results[c] = {label: {k: spread(v) for k, v in run.items()} for label, run in zip(labels, runs, strict=True)}
    return results


def roofline(ptes: list[Path], labels: list[str], results: dict, gen: int) -> dict:
    """Prints and returns each file's decode against the memory-bandwidth bound, per context."""
    from benchmarks import sizes
    from benchmarks.roofline import bytes_per_token, entry, kv_bytes_per_position, measure_bandwidth
    from exporter.config import ModelConfig
    from exporter.errors import PtekitError
    from exporter.manifest import read_manifest

    man = read_manifest(ptes[0].parent)
    if not man or "model" not in man:
        raise SystemExit(f"--roofline: {ptes[0].parent} has no export manifest to read the model's shape from")
    shape = {k: v for k, v in man["model"].items() if k != "parameters"}
    cfg = ModelConfig.from_dict(shape)
    try:
        kv_rows = {pte: kv_bytes_per_position(pte, cfg.n_kv_heads) for pte in ptes}
    except PtekitError as e:
        raise SystemExit(f"--roofline: {e}") from None
    bw = measure_bandwidth()
    print(f"\nroofline: {bw['gb_per_s']} GB/s ({bw['method']}, {bw['threads']} threads)")
    print("| context | file | MB read per token | bound (tok/s) | decode (tok/s) | share of the bound |")
    print("| --: | :-- | --: | --: | --: | --: |")
    out = {"bandwidth": bw, "rows": []}
    for c, per in results.items():
        for label, pte in zip(labels, ptes, strict=True):
            method = (read_manifest(pte.parent) or {}).get("method", "ptq")
            bpt = bytes_per_token(pte.stat().st_size, sizes.embedding_bytes(cfg, method), kv_rows[pte], c + gen / 2)
            e = {"context": c, "file": label, **entry(label, per[label]["decode"]["median"], bpt, bw["bytes_per_s"])}
            out["rows"].append(e)
            print(f"| {c} | {label} | {bpt / 1e6:.1f} | {e['bound_tok_s']:.1f} | {e['decode_tok_s']:.2f} | "
                  f"{100 * e['share_of_bound']:.0f}% |")
    return out


if __name__ == "__main__":
    sys.exit(main())
