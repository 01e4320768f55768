"""Will an export fit in memory? Its peak resident memory estimated from the checkpoint's shape,
checked against what the machine has before any weight is read, so a stage that cannot fit stops
with a sentence instead of the kernel's out-of-memory kill an hour in.

The estimates are the larger of the method's own (its `memory_need(cfg, parameters, inputs)`, when
the method module defines one) and lowering's. Lowering's is fitted to measured peaks
(`python -m benchmarks.export_memory`, BENCHMARKS.md): about 3.2 bytes per parameter, the packed
weights held by the ExecuTorch program while the next pass builds its copy, plus the KV cache and
a fixed floor for torch and executorch themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exporter.config import ModelConfig
from exporter.errors import PtekitError

GiB = 2**30
LOWER_BYTES_PER_PARAMETER = 3.2
RUNTIME_FLOOR = int(0.7 * GiB)  # torch, torchao and executorch loaded, before any weight


@dataclass(frozen=True)
class Need:
    stage: str  # "quantize (ptq)", "lower to XNNPACK"
    bytes: int
    lower_it: str = ""  # what makes it smaller, as the user would type it; "" when nothing does


# Bytes a (position, head) row of K or V takes in each cache layout, for head_dim values: `--kv-cache`'s
# fp32 and int8 (one byte a value plus an fp32 scale and an int8 zero point), and llama.cpp's fp16.
KV_ROW_BYTES = {"fp32": lambda d: 4 * d, "fp16": lambda d: 2 * d, "int8": lambda d: d + 4 + 1}


def kv_cache_bytes(cfg: ModelConfig, positions: int, kv_cache: str = "fp32") -> int:
    """K and V of every layer for `positions` positions, in the cache layout `kv_cache`."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * positions * KV_ROW_BYTES[kv_cache](cfg.head_dim)


def lowering_need(cfg: ModelConfig, parameters: int, max_seq_len: int, kv_cache: str = "fp32") -> Need:
    return Need("lower to XNNPACK", int(LOWER_BYTES_PER_PARAMETER * parameters) + kv_cache_bytes(cfg, max_seq_len, kv_cache)
                + RUNTIME_FLOOR, "--max-seq-len (the KV cache)" if max_seq_len > 2048 else "")


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping; None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check(needs: list[Need], where: str, available: int | None = None) -> None:
    """Raises PtekitError naming the stage, its need, what is available and what lowers it, when the
    largest need exceeds the available memory."""
    available = available_bytes() if available is None else available
    if available is None or not needs:
        return
    need = max(needs, key=lambda n: n.bytes)
    if need.bytes <= available:
        return
    hint = f"lower it with {need.lower_it}, " if need.lower_it else ""
    raise PtekitError(
        f"{where}: the export needs about {need.bytes / GiB:.1f} GiB of memory at its peak ({need.stage}) and this "
        f"machine has {available / GiB:.1f} GiB available; {hint}free memory, or pass --no-memory-check to try anyway"
    )
