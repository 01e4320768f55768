"""A copy of a .pte with the attention's tensors moved in the planned memory, to test whether where they lie
explains a speed difference.

    python -m benchmarks.tools.move_planned_tensors IN.pte OUT.pte --what query|output|caches [--offset 0x800]

ExecuTorch's memory planning gives every tensor an offset in one arena. `query` and `output` move the
query and the output of every `llama::custom_sdpa` call into one new region past the arena's end (its
start `--offset` bytes past a 1 MiB boundary); the calls run one after another, so one region serves them
all. `caches` moves every tensor from the lowest K/V cache offset up (the caches lie last) by `--offset`.
Nothing else changes: the instructions, the delegates and the weights are the file's own, and the arena
grows to hold the moved tensors. A file whose logits then differ is not a placement test; compare them
(its logits should match the original's to rounding).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MiB = 1 << 20


def sdpa_calls(plan) -> list:
    """The argument value indices of every llama::custom_sdpa call in an execution plan, in order."""
    return [i.instr_args.args for i in plan.chains[0].instructions
            if type(i.instr_args).__name__ == "KernelCall" and "sdpa" in plan.operators[i.instr_args.op_index].name]


def _tensor(plan, index):
    return plan.values[index].val


def move(src: Path, dst: Path, what: str, offset: int) -> int:
    """Writes dst; returns how many tensors moved."""
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary

    from exporter.atomic import write_bytes
    from exporter.errors import PtekitError
    from exporter.runtime import check_pte_header

    try:
        check_pte_header(src)  # the project's own check: a program header, before the flatbuffer is parsed
    except FileNotFoundError:
        raise SystemExit(f"{src}: no such .pte file") from None
    except PtekitError as e:
        raise SystemExit(str(e)) from None
    pte = deserialize_pte_binary(src.read_bytes())
    plan = pte.program.execution_plan[0]
    calls = sdpa_calls(plan)
    if not calls:
        raise SystemExit(f"{src}: no llama::custom_sdpa call to move tensors of")
    size = plan.non_const_buffer_sizes[1]
    moved = 0
    if what in ("query", "output"):
        arg = 0 if what == "query" else -1  # custom_sdpa.out(query, k_cache, v_cache, ..., out)
        tensors = [_tensor(plan, c[arg]) for c in calls]
        region = (size + MiB) // MiB * MiB + offset
        nbytes = _bytes(tensors[0])
        for t in tensors:
            t.allocation_info.memory_offset_low = region
            moved += 1
        plan.non_const_buffer_sizes[1] = region + nbytes
    else:
        caches = {i for c in calls for i in c[1:3]}
        low = min(_tensor(plan, i).allocation_info.memory_offset_low for i in caches)
        for v in plan.values:
            t = v.val
            info = getattr(t, "allocation_info", None)
            if info is not None and info.memory_id == 1 and info.memory_offset_low >= low:
                info.memory_offset_low += offset
                moved += 1
        plan.non_const_buffer_sizes[1] = size + offset
    write_bytes(dst, bytes(serialize_pte_binary(pte)))
    return moved


def _bytes(t) -> int:
    """The tensor's size at its upper bound (the planner's), fp32 or int8."""
    n = 1
    for d in t.sizes:
        n *= d
    return n * (4 if t.scalar_type == 6 else 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--what", choices=("query", "output", "caches"), required=True)
    ap.add_argument("--offset", type=lambda s: int(s, 0), default=0,
                    help="query/output: bytes past a 1 MiB boundary; caches: bytes to move them by")
    a = ap.parse_args(argv)
    print(f"{a.dst}: moved {move(a.src, a.dst, a.what, a.offset)} tensors ({a.what}, offset {a.offset:#x})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
