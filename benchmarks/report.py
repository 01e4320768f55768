"""The suite's record as tables (markdown) and a chart (PNG).

The first table is the model card's: medians of the measured runs, quantized rows relative to
BF16 ("decode 50.2 (2.6x)", "TTFT 0.3 (-76.9%)", "size 1083 (-54.1%)"), with perplexity and KL
from `ptekit eval` beside them. Then the peers with ratios, the roofline, and the size breakdown.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import sizes
from benchmarks.roofline import bytes_per_token, entry, kv_bytes_per_position
from exporter.config import ModelConfig
from exporter.memory import kv_cache_bytes
from quant import registry

MIB = 2**20


def _med(bench: dict, metric: str):
    return bench["summary"].get(metric, {}).get("median")


def _speed(v, base):
    return "n/a" if v is None else f"{v:,.1f}" + (f" ({v / base:.1f}x)" if base else "")


def _change(v, base, digits):
    return "n/a" if v is None else f"{v:,.{digits}f}" + (f" ({(v / base - 1) * 100:+.1f}%)" if base else "")


def _pm(s: dict | None, fmt: str) -> str:
    if not s:
        return "n/a"
    return f"{s['mean']:{fmt}}" + ("" if s.get("se") is None else f" ± {s['se']:{fmt}}")


def cells(bench: dict) -> dict:
    return {"decode": _med(bench, "decode_tok_s"), "ttft": _med(bench, "ttft_s"), "prefill": _med(bench, "prefill_tok_s"),
            "size": bench["model"]["pte_bytes"] / MIB, "rss": _med(bench, "peak_rss_mib")}


def model_card_table(record: dict) -> str:
    methods = record["methods"]
    baseline = registry.BASELINE
    base = cells(methods[baseline]["bench"]) if baseline in methods and len(methods) > 1 else {}
    lines = ["| Model | Decode (tokens/sec) | Time-to-first-token (sec) | Prefill (tokens/sec) | Model size (PTE file "
             "size in MiB) | Memory size (RSS in MiB) | Perplexity (WikiText-2) | KL vs BF16 | Top-1 agreement | "
             "Export wall / CPU (s) |",
             "| :---- | ----: | ----: | ----: | ----: | ----: | ----: | ----: | ----: | ----: |"]
    for method, e in methods.items():
        c = cells(e["bench"])
        rel = {} if method == baseline else base
        q = (e.get("quality") or {}).get("metrics")
        ppl = "n/a" if not q else f"{q['perplexity']['value']:.3f}" + (
            f" (±{q['perplexity']['value'] * q['nll']['se']:.3f})" if q["nll"].get("se") else "")
        label = f"{record['model']} {registry.label(method)}" + (" (baseline)" if method == baseline and base else "")
        lines.append("| " + " | ".join([
            label, _speed(c["decode"], rel.get("decode")), _change(c["ttft"], rel.get("ttft"), 3),
            _speed(c["prefill"], rel.get("prefill")), _change(c["size"], rel.get("size"), 1),
            _change(c["rss"], rel.get("rss"), 0), ppl, _pm(q and q["kl"], ".3g"), _pm(q and q["top1_agreement"], ".4f"),
            f"{e['export']['wall_s']:.0f} / {e['export']['cpu_s']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def peer_rows(record: dict) -> list[dict]:
    """ptekit's PTQ .pte and each peer on the same measures; ratios are ptekit / peer (speeds: >1 is
    ptekit faster; sizes, RSS, times: <1 is ptekit smaller/quicker)."""
    ours = record["methods"].get("ptq")
    if ours is None:
        return []
    rows = [{"name": "ptekit ptq (.pte, ExecuTorch runner)", "export_s": ours["export"]["wall_s"],
             "export_cpu_s": ours["export"]["cpu_s"], "size_mib": ours["bench"]["model"]["pte_bytes"] / MIB,
             **_speeds(ours["bench"])}]
    el = record["peers"].get("export_llama")
    if el:
        rows.append({"name": "export_llama 8da4w g32 (.pte, ExecuTorch runner)", "export_s": el["export"]["wall_s"],
                     "export_cpu_s": el["export"]["cpu_s"], "size_mib": el["export"]["pte_bytes"] / MIB,
                     **_speeds(el["bench"])})
    lc = record["peers"].get("llamacpp", {}).get("bench")
    if lc:
        rows.append({"name": f"llama.cpp {Path(lc['gguf']).name} (llama-cpp-python {lc['llama_cpp_python']})",
                     "export_s": None, "export_cpu_s": None, "size_mib": lc["gguf_bytes"] / MIB, **_speeds(lc)})
    for r in rows[1:]:
        r["ratio"] = {k: (None if r[k] in (None, 0) or rows[0][k] is None else round(rows[0][k] / r[k], 3))
                      for k in ("export_s", "size_mib", "decode", "prefill", "ttft", "rss")}
    return rows


def _speeds(bench: dict) -> dict:
    return {"decode": _med(bench, "decode_tok_s"), "prefill": _med(bench, "prefill_tok_s"), "ttft": _med(bench, "ttft_s"),
            "rss": _med(bench, "peak_rss_mib")}


def peers_table(record: dict) -> str:
    rows = peer_rows(record)
    if len(rows) < 2:
        return "(no peers measured)\n"

    def f(v, d=1):
        return "n/a" if v is None else f"{v:,.{d}f}"

    lines = ["| Runtime | Export wall (s) | Export CPU (s) | Size (MiB) | Decode (tok/s) | Prefill (tok/s) | TTFT (s) | "
             "Peak RSS (MiB) |", "| :---- | ----: | ----: | ----: | ----: | ----: | ----: | ----: |"]
    for r in rows:
        lines.append(f"| {r['name']} | {f(r['export_s'], 0)} | {f(r['export_cpu_s'], 0)} | {f(r['size_mib'])} | "
                     f"{f(r['decode'])} | {f(r['prefill'])} | {f(r['ttft'], 3)} | {f(r['rss'], 0)} |")
    lines += ["", "| ptekit ptq / peer | export time | size | decode | prefill | TTFT | RSS |",
              "| :---- | ----: | ----: | ----: | ----: | ----: | ----: |"]
    for r in rows[1:]:
        q = r["ratio"]
        lines.append(f"| {r['name']} | " + " | ".join("n/a" if q[k] is None else f"{q[k]:.2f}x"
                                                    for k in ("export_s", "size_mib", "decode", "prefill", "ttft", "rss")) + " |")
    return "\n".join(lines) + "\n"


def roofline_rows(record: dict) -> list[dict]:
    cfg = ModelConfig.from_dict(record["config"])
    bw = record["bandwidth"]["bytes_per_s"]
    opts = record["options"]
    mean_pos = opts["prompt_len"] + opts["gen"] / 2
    rows = []
    # Each file's cache as its program holds it: a bf16 export's cache is bf16, an int8 one's int8.
    for method, e in record["methods"].items():
        kv = kv_bytes_per_position(Path(e["export"]["pte"]), cfg.n_kv_heads)
        bpt = bytes_per_token(e["export"]["pte_bytes"], sizes.embedding_bytes(cfg, method), kv, mean_pos)
        rows.append(entry(f"ptekit {method}", _med(e["bench"], "decode_tok_s"), bpt, bw))
    el = record["peers"].get("export_llama")
    if el:
        kv = kv_bytes_per_position(Path(el["export"]["pte"]), cfg.n_kv_heads)
        bpt = bytes_per_token(el["export"]["pte_bytes"], sizes.embedding_bytes(cfg, "ptq"), kv, mean_pos)
        rows.append(entry("export_llama", _med(el["bench"], "decode_tok_s"), bpt, bw))
    lc = record["peers"].get("llamacpp", {}).get("bench")
    if lc:
        parts = lc["parts"]
        # Tied weights: llama.cpp's classifier reads token_embd itself, so the whole table is traffic.
        embd = parts["token_embd_bytes"] if parts["has_output_weight"] else 0
        bpt = bytes_per_token(parts["tensor_bytes"], embd, kv_cache_bytes(cfg, 1, "fp16"), mean_pos)
        rows.append(entry("llama.cpp", _med(lc, "decode_tok_s"), bpt, bw))
    return rows


def roofline_table(record: dict) -> str:
    bw = record["bandwidth"]
    lines = [f"Measured memory bandwidth: {bw['gb_per_s']} GB/s ({bw['method']}, {bw['threads']} threads).", "",
             "| Runtime | Bytes read per decoded token (MB) | Bound (tok/s) | Decode (tok/s) | Share of bound | "
             "Achieved (GB/s) |", "| :---- | ----: | ----: | ----: | ----: | ----: |"]
    for r in record.get("roofline") or roofline_rows(record):
        share = "n/a" if r["share_of_bound"] is None else f"{r['share_of_bound'] * 100:.0f}%"
        lines.append(f"| {r['name']} | {r['bytes_per_token'] / 1e6:.1f} | {r['bound_tok_s']:.1f} | "
                     f"{r['decode_tok_s'] or 'n/a'} | {share} | {r['achieved_gb_per_s'] or 'n/a'} |")
    return "\n".join(lines) + "\n"


def size_rows(record: dict) -> list[dict]:
    """Each measured .pte beside the size computed from the model's shape (benchmarks/sizes.py)."""
    cfg = ModelConfig.from_dict(record["config"])
    out = []
    for method, e in record["methods"].items():
        parts = sizes.computed_parts(cfg, "bf16" if method == "bf16" else "ptq", record["options"]["max_seq_len"])
        out.append({"method": method, "measured_bytes": e["export"]["pte_bytes"], "computed": parts.as_dict(),
                    "rest_bytes": e["export"]["pte_bytes"] - parts.total()})
    return out


def sizes_table(record: dict) -> str:
    lines = ["| .pte | measured (MB) | computed weights+scales (MB) | block linears | block scales | embedding | "
             "classifier | norms+RoPE | rest: program, graph, LoRA (MB) |",
             "| :---- | ----: | ----: | ----: | ----: | ----: | ----: | ----: | ----: |"]
    for r in record.get("sizes") or size_rows(record):
        c = r["computed"]
        mb = lambda b: f"{b / 1e6:.2f}"  # noqa: E731
        lines.append(f"| {r['method']} | {mb(r['measured_bytes'])} | {mb(c['total'])} | {mb(c['block_weights'])} | "
                     f"{mb(c['block_scales'])} | {mb(c['embedding'])} | {mb(c['classifier'])} | "
                     f"{mb(c['norms'] + c['rope'])} | {mb(r['rest_bytes'])} |")
    return "\n".join(lines) + "\n"


def markdown(record: dict) -> str:
    m = record["machine"]
    o = record["options"]
    quality = (f"Quality: `ptekit eval` on each .pte, the first {o['eval_max_tokens']} tokens of WikiText-2 test in "
               f"windows of {o['eval_seq_len']} (± one standard error over windows)." if o["eval_max_tokens"] else
               "Quality: not measured (--eval-max-tokens 0; random weights have none).")
    parts = [
        f"## {record['model']}: ptekit methods and peers ({record['started_at']})", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_total_mib']} MiB RAM, {m['os']}; load average at start "
        f"{m['load_avg_at_start']} (a shared machine: other processes ran during the measurement).",
        f"Runs: median of {o['runs']} after {o['warmup']} warm-up, each a fresh process; prompt {o['prompt_len']} "
        f"tokens of WikiText-2 test text, {o['gen']} generated tokens, greedy, {o['threads'] or m['cores']} threads; "
        f"max_seq_len {o['max_seq_len']}. {quality}", "",
        model_card_table(record), "### Peers", "", peers_table(record), "### Roofline", "", roofline_table(record),
        "### Size breakdown (computed from the shape, beside the measured file)", "", sizes_table(record),
    ]
    skipped = {k: v["skipped"] for k, v in record["peers"].items() if "skipped" in v}
    if skipped:
        parts += ["Not measured: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()), ""]
    return "\n".join(parts)


def chart(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from exporter.atomic import atomic_path

    names, decode, size, rss = [], [], [], []
    for method, e in record["methods"].items():
        c = cells(e["bench"])
        names.append(f"ptekit\n{registry.label(method)}")
        decode.append(c["decode"] or 0), size.append(c["size"]), rss.append(c["rss"] or 0)
    for r in peer_rows(record)[1:]:
        runtime, _, what = r["name"].split(" (")[0].partition(" ")
        names.append(f"{runtime}\n{Path(what).suffix.lstrip('.') or what}")  # "llama.cpp\ngguf": a file name overlaps its neighbours
        decode.append(r["decode"] or 0), size.append(r["size_mib"]), rss.append(r["rss"] or 0)
    bounds = {r["name"]: r["bound_tok_s"] for r in record.get("roofline") or roofline_rows(record)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    colors = ["#4c72b0"] * len(record["methods"]) + ["#dd8452", "#55a868"][: len(names) - len(record["methods"])]
    for ax, vals, title in ((axes[0], decode, "Decode (tokens/s)"), (axes[1], size, "Model file (MiB)"),
                            (axes[2], rss, "Peak RSS (MiB)")):
        bars = ax.bar(range(len(names)), vals, color=colors)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(title)
    keys = [f"ptekit {m}" for m in record["methods"]] + [k for k in ("export_llama", "llama.cpp") if k in bounds]
    for i, k in enumerate(keys):
        if k in bounds:
            axes[0].plot([i - 0.4, i + 0.4], [bounds[k]] * 2, color="black", linestyle="--", linewidth=1,
                         label="memory-bandwidth bound" if k == keys[0] else None)
    if bounds:
        axes[0].set_ylim(top=1.2 * max([*bounds.values(), *decode]))  # room for the legend above the bounds
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{record['model']} on {record['machine']['cpu']} ({record['machine']['cores']} cores), "
                 f"{record['started_at'][:10]}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
