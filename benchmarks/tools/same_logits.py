"""Whether two .pte files give the same logits, bit for bit, over a prompt and greedy decode steps.

    python -m benchmarks.tools.same_logits A.pte B.pte [--prompt-len 64] [--steps 100]

For a change that should not change the numbers (an operator removed, a tensor moved): both files prefill
the same prompt, then decode the same tokens (A's greedy choices, fed to both), and every step's logits
are compared. Prints whether all were identical and the largest absolute difference. Exits 1 if they
differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def compare(a: Path, b: Path, prompt_len: int, steps: int) -> tuple[bool, float]:
    import torch

    from benchmarks.tools.profile_decode import fixed_prompt
    from exporter.runtime import PteModel

    pa, pb = PteModel(a), PteModel(b)
    prompt = fixed_prompt(prompt_len)
    la, lb = pa.forward(prompt, 0), pb.forward(prompt, 0)
    same, worst = torch.equal(la, lb), (la - lb).abs().max().item()
    for pos in range(prompt_len, prompt_len + steps):
        token = int(la.argmax())
        la, lb = pa.forward([token], pos), pb.forward([token], pos)
        same, worst = same and torch.equal(la, lb), max(worst, (la - lb).abs().max().item())
    return same, worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args(argv)
    from exporter import openmp

    openmp.runtime_process()  # before torch loads libgomp
    from exporter.errors import PtekitError

    try:
        same, worst = compare(a.a, a.b, a.prompt_len, a.steps)
    except PtekitError as e:  # a missing or unreadable .pte: one line naming it
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'identical' if same else 'different'}: largest absolute difference {worst:.6g} over a "
          f"{a.prompt_len}-token prompt and {a.steps} decode steps")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
