"""Side-by-side runs with every file loaded first once: one fresh process per rotation of the files.

On the 2-core Intel Xeon VM, a .pte loaded first into a process ran its XNNPACK GEMMs up to 18% slower
than the same file loaded second into the same process (docs/decode-profile.md, "The order the files
are loaded in"), so a comparison made in one process favours whichever file it loads later. The
benchmarks that set files side by side (pte_speed, profile_decode) therefore run once per rotation
(A B C, B C A, C A B), each in its own interpreter, and pool what the runs measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Passed to each child: it measures the files in the order given, in its own process.
ONE_ORDER_FLAG = "--one-load-order"


def add_one_order_flag(ap, combined: str) -> None:
    """The benchmark's --one-load-order; `combined` says what it does with the orders' runs by default."""
    ap.add_argument(ONE_ORDER_FLAG, action="store_true",
                    help=f"load the files once, in the order given, in this process (by default every file is "
                         f"loaded first once, each order in a fresh process, and {combined})")


def rotations(n: int) -> list[list[int]]:
    """The n cyclic orders of n items: each item comes first in exactly one."""
    return [list(range(k, n)) + list(range(k)) for k in range(n)]


def run_each_order(module: str, ptes: list[Path], labels: list[str] | None, args: list[str]) -> list[dict]:
    """Runs `python -m module` once per rotation of ptes (with --labels in the same order where labels are
    given, then `args`, the one-order flag and --json) and returns each run's JSON record, in rotation
    order. A failed child is a SystemExit naming the order; the child's own error is on stderr above it."""
    names = labels or [str(p) for p in ptes]
    records = []
    with tempfile.TemporaryDirectory(prefix="ptekit-load-order-") as d:
        for k, order in enumerate(rotations(len(ptes))):
            out = Path(d) / f"order-{k}.json"
            cmd = [sys.executable, "-m", module, *(str(ptes[i]) for i in order),
                   *(["--labels", ",".join(labels[i] for i in order)] if labels else []),
                   *args, ONE_ORDER_FLAG, "--json", str(out)]
            print(f"load order {k + 1}/{len(ptes)}: {', '.join(names[i] for i in order)}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress) passes through
            if proc.returncode != 0:
                raise SystemExit(f"{module} failed in load order {', '.join(names[i] for i in order)} "
                                 f"(exit {proc.returncode}); its error is above")
            records.append(json.loads(out.read_text()))
    return records
