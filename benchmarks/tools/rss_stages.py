"""Where a .pte's resident memory comes from: the runner's RSS, anonymous and file-backed, at each stage.

    python -m benchmarks.tools.rss_stages MODEL.pte TOKENIZER [--prompt-len 64] [--gen 128]

Runs ExecuTorch's TextLLMRunner (what ptekit's host llama_main runs) in this process and reads
/proc/self/status before the model loads, after the first generation of one token (load, the
delegate's weight packing, the prompt's prefill) and after --gen tokens. Each stage's increase
over the one before is printed in MiB, split into anonymous memory (what the runtime allocated)
and file pages (the mapped .pte, libraries).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def status() -> dict:
    from android_runner.runner import rss_mib

    return {f: round(rss_mib(f), 1) for f in FIELDS}


def stages(pte: Path, tokenizer: Path, prompt_len: int, gen: int, threads: int) -> list[tuple[str, dict]]:
    from android_runner.prompt import benchmark_prompt
    from exporter.lower import load_executorch_ops
    from exporter.tokenizer import Tokenizer

    prompt = benchmark_prompt(Tokenizer(tokenizer), prompt_len)
    load_executorch_ops()
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from exporter.runtime import set_runtime_threads

    set_runtime_threads(threads)
    out = [("before load", status())]
    runner = TextLLMRunner(str(pte), str(tokenizer), None)
    out.append(("runner built", status()))
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=1, seq_len=prompt_len + 1))
    out.append((f"load + prefill of {prompt_len} + 1 token", status()))
    runner.reset()
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=gen, seq_len=prompt_len + gen))
    out.append((f"again, {gen} tokens", status()))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte", type=Path)
    ap.add_argument("tokenizer", type=Path)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    for f in (a.pte, a.tokenizer):
        if not f.is_file():
            print(f"error: {f}: no such file", file=sys.stderr)
            return 2
    rows = stages(a.pte, a.tokenizer, a.prompt_len, a.gen, a.threads)
    print(f"{a.pte} ({a.pte.stat().st_size / 2**20:,.1f} MiB)")
    print("| stage | VmRSS | RssAnon | RssFile | +anon | +file |")
    print("| :--- | ---: | ---: | ---: | ---: | ---: |")
    prev = rows[0][1]
    for name, s in rows:
        print(f"| {name} | {s['VmRSS']:,.1f} | {s['RssAnon']:,.1f} | {s['RssFile']:,.1f} | "
              f"{s['RssAnon'] - prev['RssAnon']:+,.1f} | {s['RssFile'] - prev['RssFile']:+,.1f} |")
        prev = s
    print(f"peak (VmHWM) {rows[-1][1]['VmHWM']:,.1f} MiB")
    if a.json:
        from exporter.atomic import write_text

        write_text(a.json, json.dumps({"pte": str(a.pte), "stages": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
