"""How a .pte's decode steps use the process's threads: CPU time and sleeps per thread.

    python -m benchmarks.tools.thread_ticks FILE [--context 1024] [--steps 64] [--threads 2] [--token N]

Prefills a prompt of --context tokens, then times --steps decode steps and reads, for every thread of
the process, how often it went to sleep (voluntary context switches), how often it was preempted, and
its user and system CPU time in clock ticks over those steps (/proc/self/task/*/status and stat). Each
step feeds the greedy token, or --token at every step (the attention's work depends on the position, not
on the token). A thread that runs all the time while another sleeps once a layer is the imbalance
docs/decode-profile.md traces to the kernel that ran before the attention.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path


def thread_counters() -> dict[int, dict[str, int]]:
    """Per thread id: voluntary and involuntary context switches, user and system ticks."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            status = Path(f"/proc/self/task/{tid}/status").read_text()
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        after_name = stat.rsplit(")", 1)[1].split()  # field 3 (state) onwards; utime and stime are 14 and 15
        out[int(tid)] = {
            "sleeps": int(fields["voluntary_ctxt_switches"]),
            "preempted": int(fields["nonvoluntary_ctxt_switches"]),
            "user_ticks": int(after_name[11]),
            "system_ticks": int(after_name[12]),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pte", type=Path)
    ap.add_argument("--context", type=int, default=1024, help="prompt length before the timed steps (default 1024)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps counted (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="the runtime's thread pool size (default 2)")
    ap.add_argument("--token", type=int, help="feed this token at every step instead of the greedy one")
    a = ap.parse_args(argv)

    from exporter.openmp import runtime_process

    runtime_process()
    import torch

    from exporter.errors import PtekitError
    from exporter.runtime import PteModel, set_runtime_threads

    try:
        model = PteModel(a.pte)
    except PtekitError as e:
        raise SystemExit(str(e)) from None
    set_runtime_threads(a.threads)  # after loading, as benchmarks.pte_speed does
    from benchmarks.pte_speed import prompt_ids

    prompt = prompt_ids(a.pte, a.context, int(model.meta("get_vocab_size", 32000)))

    def next_token(logits: torch.Tensor) -> int:
        return int(logits.argmax()) if a.token is None else a.token

    logits = model.forward(prompt, 0)
    logits = model.forward([next_token(logits)], a.context)  # one step before counting: the pool is warm
    before = thread_counters()
    t0 = time.perf_counter()
    for i in range(a.steps):
        logits = model.forward([next_token(logits)], a.context + 1 + i)
    seconds = time.perf_counter() - t0
    after = thread_counters()

    caller = threading.get_native_id()
    print(f"{a.pte}: {a.steps} decode steps after {a.context} positions, {a.threads} threads: "
          f"{a.steps / seconds:.2f} tok/s, {seconds * os.sysconf('SC_CLK_TCK'):.0f} ticks of wall clock")
    print("| thread | sleeps | preempted | user ticks | system ticks |")
    print("| :-- | --: | --: | --: | --: |")
    for tid in sorted(after):
        if tid not in before:
            continue
        d = {k: after[tid][k] - before[tid][k] for k in after[tid]}
        if not any(d.values()):
            continue
        name = "calling thread" if tid == caller else f"thread {tid}"
        print(f"| {name} | {d['sleeps']} | {d['preempted']} | {d['user_ticks']} | {d['system_ticks']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
