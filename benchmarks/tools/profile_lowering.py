"""Where lowering spends its time: the first N blocks of a checkpoint, ptq, lowered under cProfile.

    python -m benchmarks.tools.profile_lowering smollm2-135m 4 --stats out/prof_4.out
    python -m benchmarks.tools.profile_lowering smollm2-135m 4 --no-profile [--every-xnnpack-pass]

Prints CPU seconds for torch.export and for to_edge_transform_and_lower + to_executorch, and the
serialized program's size and hash; the profile file opens with `python -m pstats`. Lowering is
CPU-bound Python, so CPU seconds compare across runs even on a shared machine where wall time does
not. --every-xnnpack-pass also runs the XNNPACK passes exporter.lower leaves out as changing nothing
(the time they cost, and the same bytes); --no-profile times without cProfile's overhead.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import hashlib
import time
from pathlib import Path

from torch import nn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("layers", type=int)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--stats", type=Path, default=Path("lowering.prof"))
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--every-xnnpack-pass", action="store_true")
    a = ap.parse_args()

    import exporter.lower
    from exporter.checkpoint import build_model, load_checkpoint
    from exporter.defaults import resolve_checkpoint_arg
    from exporter.lower import LowerOptions, export_programs, metadata, to_program
    from quant.ptq import apply_scheme

    model = build_model(load_checkpoint(resolve_checkpoint_arg(a.checkpoint)), max_seq_len=a.max_seq_len)
    model.layers = nn.ModuleList(list(model.layers)[: a.layers])
    model.config = dataclasses.replace(model.config, n_layers=a.layers)  # the .pte metadata reads it
    model = apply_scheme(model)
    if a.every_xnnpack_pass:
        exporter.lower._passes_without_effect_on_llms = lambda: ()
    opts = LowerOptions(max_seq_len=a.max_seq_len)
    prof = cProfile.Profile()
    t0 = time.process_time()
    if not a.no_profile:
        prof.enable()
    programs = export_programs(model, opts)
    t1 = time.process_time()
    buffer = to_program(programs, metadata(model, opts))[0].buffer  # serialized, as a write would
    prof.disable()
    t2 = time.process_time()
    where = "no profile"
    if not a.no_profile:
        prof.dump_stats(str(a.stats))
        where = f"profile in {a.stats}"
    print(f"{a.layers} blocks: torch.export {t1 - t0:.1f} CPU-s, to_edge_transform_and_lower + to_executorch "
          f"{t2 - t1:.1f} CPU-s; {len(buffer)} bytes, sha256 {hashlib.sha256(buffer).hexdigest()[:16]}; {where}")


if __name__ == "__main__":
    main()
