"""Results as JSON (every run and the summary) and as the markdown table of Meta's Llama 3.2 model
card ("Inference time": decode, time to first token, prefill, .pte size, RSS; quantized rows
relative to the BF16 baseline)."""

from __future__ import annotations

import json
from pathlib import Path

from exporter.atomic import write_files
from quant import registry

COLUMNS = ("Model", "Decode (tokens/sec)", "Time-to-first-token (sec)", "Prefill (tokens/sec)",
           "Model size (PTE file size in MiB)", "Memory size (RSS in MiB)")


def to_json(results: list[dict]) -> str:
    return json.dumps({"format": "ptekit-bench/1", "results": results}, indent=2) + "\n"


def _median(r: dict, metric: str):
    return r["summary"].get(metric, {}).get("median")


def _cells(r: dict) -> dict:
    return {"decode": _median(r, "decode_tok_s"), "ttft": _median(r, "ttft_s"), "prefill": _median(r, "prefill_tok_s"),
            "size": r["model"]["pte_mib"], "rss": _median(r, "peak_rss_mib")}


def _fmt(v, digits: int, base=None, speed: bool = False) -> str:
    if v is None:
        return "n/a"
    text = f"{v:,.{digits}f}"
    if base:
        # Speeds as a multiple of the baseline, times and sizes as a change, as the model card does.
        text += f" ({v / base:.1f}x)" if speed else f" ({(v / base - 1) * 100:+.1f}%)"
    return text


def _label(r: dict, baseline: dict | None) -> str:
    label = r["model"]["label"]
    if r is baseline:
        label += " (baseline)"
    if not r.get("complete", True):
        label += f" (incomplete: {len(r['runs'])} of {r['settings']['runs']} runs)"
    return label


def markdown_table(results: list[dict]) -> str:
    """Medians over the measured runs; a bf16 result, when present, is the baseline row."""
    results = [r for r in results if r["runs"]]
    if not results:
        return "(no finished runs)\n"
    baseline = next((r for r in results if r["model"].get("method") == registry.BASELINE), None)
    base = _cells(baseline) if baseline and len(results) > 1 else {}
    lines = ["| " + " | ".join(COLUMNS) + " |", "| :---- | ----: | ----: | ----: | ----: | ----: |"]
    for r in results:
        c = _cells(r)
        rel = {} if r is baseline else base
        lines.append("| " + " | ".join([
            _label(r, baseline if base else None),
            _fmt(c["decode"], 1, rel.get("decode"), speed=True),
            _fmt(c["ttft"], 3, rel.get("ttft")),
            _fmt(c["prefill"], 1, rel.get("prefill"), speed=True),
            _fmt(c["size"], 1, rel.get("size")),
            _fmt(c["rss"], 0, rel.get("rss")),
        ]) + " |")
    return "\n".join(lines) + "\n"


def spread_table(results: list[dict]) -> str:
    """Min-max over the measured runs, for the same metrics."""
    lines = ["| Model | runs | Decode min-max | TTFT min-max (s) | Prefill min-max | RSS min-max (MiB) |",
             "| :---- | ---: | ----: | ----: | ----: | ----: |"]
    for r in results:
        if not r["runs"]:
            continue
        s = r["summary"]

        def rng(m, d, s=s):
            return f"{s[m]['min']:.{d}f}-{s[m]['max']:.{d}f}" if m in s else "n/a"

        lines.append(f"| {r['model']['label']} | {len(r['runs'])} | {rng('decode_tok_s', 1)} | {rng('ttft_s', 3)} | "
                     f"{rng('prefill_tok_s', 1)} | {rng('peak_rss_mib', 0)} |")
    return "\n".join(lines) + "\n"


def notes(results: list[dict]) -> str:
    r = next((r for r in results if r["runs"]), None)
    if r is None:
        return ""
    st = r["settings"]
    runner = ("ptekit host runner (ExecuTorch's C++ LLM runner through its Python bindings)"
              if st["runner"] == "host" else f"{Path(st['runner']).name}")
    out = [
        f"Median of {st['runs']} runs after {st['warmup']} warm-up run(s), each a fresh runner process, on "
        f"{r['device'].get('summary', r['device'].get('name', '?'))} ({r['device'].get('name', '?')}).",
        f"Prompt of exactly {st['prompt_len']} tokens of WikiText-2 text, {st['gen']} new tokens (--seq_len "
        f"{st['seq_len']}), temperature {st['temperature']}, --cpu_threads {st['threads']}, "
        f"cool-down {st['cooldown_s']} s. Runner: {runner}.",
        "Decode, prefill and time to first token from the runner's PyTorchObserver timestamps; RSS is the "
        f"runner's peak VmHWM read from /proc/PID/status every {st['sample_interval_s']} s; sizes in MiB.",
    ]
    loads = [x["loadavg_before"] for res in results for x in res["runs"] if x.get("loadavg_before") is not None]
    if loads:
        cores = r["device"].get("facts", {}).get("cores", "?")
        out.append(f"1-minute load average before the measured runs: {min(loads):.1f} to {max(loads):.1f} on {cores} "
                   "cores; a 1-minute average still counts this benchmark's own previous runs, so only a "
                   "figure well above the runner's threads means other work competed with it.")
    before = [x["rss_before_model_load_mib"] for x in r["runs"] if x.get("rss_before_model_load_mib")]
    if before:
        out.append(f"The host runner's RSS includes about {min(before):.0f} MiB of Python + libtorch held before the "
                   "model loads; ExecuTorch's llama_main on a phone has no such overhead.")
    return "\n".join(f"- {line}" for line in out) + "\n"


def markdown(results: list[dict]) -> str:
    return markdown_table(results) + "\n" + spread_table(results) + "\n" + notes(results)


def write(results: list[dict], json_path: Path | None, markdown_path: Path | None) -> None:
    """The JSON and the table together: neither is replaced unless both can be."""
    files = {}
    if json_path:
        files[Path(json_path)] = to_json(results)
    if markdown_path:
        files[Path(markdown_path)] = markdown(results)
    write_files(files)
