"""The llama.cpp peer: a GGUF of the same model through llama-cpp-python, measured like the .pte.

Each run is a fresh process (so its peak RSS is its own, as with the ExecuTorch runner): load the
GGUF, prefill the same prompt the .pte benchmark uses (tokenized by llama.cpp itself, no BOS, the
same token count), then decode greedily for exactly `gen` tokens, one llama_decode per token.
Prefill tok/s = prompt tokens / prefill time; time to first token = prefill time (the first new
token is the argmax of the prefill's logits); decode tok/s = gen / decode time; peak RSS = VmHWM.

    python -m benchmarks.llamacpp_peer GGUF --prompt "..." [--gen 128] [--runs 3] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from exporter.errors import PtekitError

INSTALL = "pip install llama-cpp-python (builds llama.cpp from source, about 6 minutes; pyproject's `bench` extra)"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _vm(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


@functools.cache  # read once a process: the load and the run's record both ask
def amx_cpu() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and " amx_int8" in cpuinfo.read_text()


def load_llama(gguf, **kw):
    """llama_cpp.Llama(model_path=gguf, **kw). On a CPU with AMX, without llama.cpp's extra weight buffer
    types: the native build compiles in its AMX buffer type, and on a 2-core Xeon VM with AMX
    llama_decode crashed (SIGSEGV) with it and ran without it. llama-cpp-python has no argument for
    the setting, so its default model parameters are swapped for the one call."""
    import llama_cpp

    if not amx_cpu():
        return llama_cpp.Llama(model_path=str(gguf), **kw)
    import llama_cpp.llama_cpp as api

    default = api.llama_model_default_params

    def without_extra_buffer_types():
        params = default()
        params.use_extra_bufts = False
        return params

    api.llama_model_default_params = without_extra_buffer_types
    try:
        return llama_cpp.Llama(model_path=str(gguf), **kw)
    finally:
        api.llama_model_default_params = default


def measure_once(gguf: str, prompt: str, prompt_len: int, gen: int, threads: int, n_ctx: int) -> dict:
    """One run in this process (call it in a fresh one)."""
    import llama_cpp
    import numpy as np

    rss_before = _vm("VmRSS")
    t0 = time.perf_counter()
    llm = load_llama(gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=max(prompt_len, 64),
                     verbose=False, logits_all=False)
    load_s = time.perf_counter() - t0
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    if len(ids) < prompt_len:
        raise PtekitError(f"{gguf}: llama.cpp tokenizes the prompt to {len(ids)} tokens, fewer than {prompt_len}")
    ids = ids[:prompt_len]
    t1 = time.perf_counter()
    vocab = llm.n_vocab()

    def greedy() -> int:
        # The context's logits of the last evaluated token: llama-cpp-python 0.3.x no longer copies
        # them into llm.scores unless logits_all, which would compute every position's logits.
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    llm.eval(ids)
    nxt = greedy()
    t2 = time.perf_counter()
    out = [nxt]
    for _ in range(gen - 1):
        llm.eval([nxt])
        nxt = greedy()
        out.append(nxt)
    t3 = time.perf_counter()
    # gen tokens are produced: the first by the prefill, the other gen-1 by decode steps.
    return {"prompt_tokens": len(ids), "generated_tokens": len(out), "model_load_s": round(load_s, 3),
            "ttft_s": round(t2 - t1, 4), "prefill_tok_s": round(len(ids) / (t2 - t1), 2),
            "decode_tok_s": round((gen - 1) / (t3 - t2), 2), "peak_rss_mib": round(_vm("VmHWM"), 1),
            "rss_before_model_load_mib": round(rss_before, 1), "extra_buffer_types": not amx_cpu(),
            "text": llm.detokenize(out).decode(errors="replace")}


def bench(gguf: Path, prompt: str, prompt_len: int = 64, gen: int = 128, runs: int = 3, warmup: int = 1,
          threads: int = 0, timeout_s: float = 900) -> dict:
    """Warm-up + measured runs, each `python -m benchmarks.llamacpp_peer --one ...` in its own process."""
    if not available():
        raise PtekitError(f"llama_cpp is not installed; {INSTALL}")
    import os

    threads = threads or os.cpu_count() or 1
    cmd = [sys.executable, "-m", "benchmarks.llamacpp_peer", str(gguf), "--prompt", prompt, "--prompt-len",
           str(prompt_len), "--gen", str(gen), "--threads", str(threads), "--one"]
    runs_out = []
    for i in range(warmup + runs):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              cwd=Path(__file__).resolve().parent.parent)
        if proc.returncode != 0:
            raise PtekitError(f"{gguf}: llama.cpp run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        if i >= warmup:
            runs_out.append(rec)
    summary = {}
    for m in ("decode_tok_s", "ttft_s", "prefill_tok_s", "peak_rss_mib", "model_load_s"):
        vals = [r[m] for r in runs_out]
        summary[m] = {"median": round(statistics.median(vals), 4), "min": min(vals), "max": max(vals), "n": len(vals)}
    import llama_cpp

    return {"gguf": str(gguf), "gguf_bytes": Path(gguf).stat().st_size, "threads": threads,
            "llama_cpp_python": llama_cpp.__version__, "runs": runs_out, "summary": summary,
            "command": " ".join(cmd[:-1])}


def gguf_parts(gguf: Path) -> dict:
    """Bytes of the token embedding table and of all tensors, and the tensor types, from the GGUF header."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))
    total, embd, types = 0, 0, {}
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + n
        if t.name == "token_embd.weight":
            embd = n
    return {"tensor_bytes": total, "token_embd_bytes": embd, "bytes_by_type": types,
            "has_output_weight": any(t.name == "output.weight" for t in r.tensors)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--one", action="store_true", help="one run in this process, JSON on stdout")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(measure_once(a.gguf, a.prompt, a.prompt_len, a.gen, a.threads, a.prompt_len + a.gen + 8)))
    else:
        print(json.dumps(bench(Path(a.gguf), a.prompt, a.prompt_len, a.gen, a.runs, threads=a.threads), indent=2))


if __name__ == "__main__":
    main()
