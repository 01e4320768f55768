"""python -m benchmarks run --model smollm2 [--device SERIAL|local] [--methods bf16,ptq,spinquant,qlora] [--out DIR]

Builds every variant of one checkpoint, measures speed, size, memory and quality, runs the peers
(export_llama, llama.cpp) on the same machine, and prints the model card's table. Writes
DIR/benchmarks.json, DIR/report.md and DIR/chart.png; re-running resumes (finished steps are kept).

One-off investigations (profiles, memory by stage, the 1B sizes from its shape) live in
benchmarks/tools/, run from a checkout as `python -m benchmarks.tools.NAME`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exporter import log, quiet
from exporter.errors import PtekitError

_log = log.get(__name__)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    from benchmarks import report
    from benchmarks.suite import ALL_PEERS, RANDOM_MODELS, SuiteOptions, run

    d = SuiteOptions()
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="the whole suite on one checkpoint")
    r.add_argument("--model", default=d.model, help="smollm2 (the embedded SmolLM2-135M-Instruct), llama3.2-1b-random or "
                   "llama3.2-3b-random (Llama 3.2 1B's or 3B's exact shape, random weights, the real Llama 3 "
                   "tokenizer), or a checkpoint path")
    r.add_argument("--methods", type=_csv, default=",".join(d.methods), help="comma-separated; default: every method "
                   f"({','.join(d.methods)})")
    r.add_argument("--peers", type=_csv, default=",".join(ALL_PEERS), help="comma-separated subset of "
                   f"{','.join(ALL_PEERS)}; '' for none")
    r.add_argument("--device", default=d.device, help="'local' (this machine) or an adb serial")
    r.add_argument("--runner", default=None, help="llama_main built for the phone (android_runner/README.md); "
                   "default: ptekit's host runner")
    r.add_argument("--out", type=Path, default=d.out)
    r.add_argument("--max-seq-len", type=int, default=d.max_seq_len)
    r.add_argument("--prompt-len", type=int, default=d.prompt_len)
    r.add_argument("--gen", type=int, default=d.gen)
    r.add_argument("--runs", type=int, default=d.runs)
    r.add_argument("--warmup", type=int, default=d.warmup)
    r.add_argument("--threads", type=int, default=d.threads, help="threads for every runtime; 0: every core here (--device local, llama.cpp), a phone's llama_main its own count (-1)")
    r.add_argument("--eval-seq-len", type=int, default=d.eval_seq_len)
    r.add_argument("--eval-max-tokens", type=int, default=None, help="WikiText-2 test tokens scored per method; 0 "
                   f"skips quality (default {d.eval_max_tokens}; 0 for the random models, whose weights have none)")
    r.add_argument("--steps", type=int, default=None, help="spinquant/qlora optimization steps (default: the method's)")
    r.add_argument("--gguf", type=Path, default=None, help="the llama.cpp peer's GGUF (default for smollm2: the "
                   "embedded Q4_1 file)")
    r.add_argument("--quiet", "-q", action="store_true")
    r.add_argument("--verbose", "-v", action="store_true", help="also show the libraries' own logging (ExecuTorch's "
                   "and the tokenizer's C++ lines, Python warnings), as `ptekit --verbose` does")
    a = ap.parse_args(argv)
    log.setup()
    quiet.for_command(a.verbose)

    if a.eval_max_tokens is None:
        a.eval_max_tokens = 0 if a.model in RANDOM_MODELS else d.eval_max_tokens
    try:
        opts = SuiteOptions(model=a.model, methods=a.methods, peers=a.peers, device=a.device, runner=a.runner,
                            out=a.out, max_seq_len=a.max_seq_len, prompt_len=a.prompt_len, gen=a.gen, runs=a.runs,
                            warmup=a.warmup, threads=a.threads, eval_seq_len=a.eval_seq_len,
                            eval_max_tokens=a.eval_max_tokens, steps=a.steps, gguf=a.gguf, progress=not a.quiet)
        record = run(opts)
        print(report.markdown(record))  # the table asked for, on stdout
        _log.info(f"wrote {a.out / 'benchmarks.json'}, {a.out / 'report.md'}, {a.out / 'chart.png'}")
        return 0
    except PtekitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
