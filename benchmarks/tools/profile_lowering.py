"""Where lowering spends its time: the first N blocks of a checkpoint, ptq, lowered under cProfile.

    python -m benchmarks.tools.profile_lowering smollm2-135m 4 --stats out/prof_4.out

Prints CPU seconds for torch.export and for to_edge_transform_and_lower + to_executorch; the
profile file opens with `python -m pstats`. Lowering is CPU-bound Python, so CPU seconds compare
across runs even on a shared machine where wall time does not.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import time
from pathlib import Path

from torch import nn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("layers", type=int)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--stats", type=Path, default=Path("lowering.prof"))
    a = ap.parse_args()

    from exporter.checkpoint import build_model, load_checkpoint
    from exporter.defaults import resolve_checkpoint_arg
    from exporter.lower import LowerOptions, export_programs, metadata, to_program
    from quant.ptq import apply_scheme

    model = build_model(load_checkpoint(resolve_checkpoint_arg(a.checkpoint)), max_seq_len=a.max_seq_len)
    model.layers = nn.ModuleList(list(model.layers)[: a.layers])
    model.config = dataclasses.replace(model.config, n_layers=a.layers)  # the .pte metadata reads it
    model = apply_scheme(model)
    opts = LowerOptions(max_seq_len=a.max_seq_len)
    prof = cProfile.Profile()
    t0 = time.process_time()
    prof.enable()
    programs = export_programs(model, opts)
    t1 = time.process_time()
    _ = to_program(programs, metadata(model, opts))[0].buffer  # serialized, as a write would
    prof.disable()
    t2 = time.process_time()
    prof.dump_stats(str(a.stats))
    print(f"{a.layers} blocks: torch.export {t1 - t0:.1f} CPU-s, to_edge_transform_and_lower + to_executorch "
          f"{t2 - t1:.1f} CPU-s; profile in {a.stats}")


if __name__ == "__main__":
    main()
