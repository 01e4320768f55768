"""Calibration text -> token windows for training rotations and for GPTQ.

A file is plain text, or JSONL whose lines are objects with a "text" field (other string fields
are joined when there is none). The whole file is tokenized once, as one stream, and cut into
non-overlapping windows; which windows a run uses is drawn from a seed, so a run is reproducible
and a resumed run sees the same batches. The default is WikiText-2's validation split: the test
split is for evaluation only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exporter.errors import PtekitError

DEFAULT_CALIBRATION = "wikitext-2-valid-tokens.txt"


def default_calibration() -> Path:
    from exporter.defaults import data_file

    return data_file(DEFAULT_CALIBRATION)


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise PtekitError(f"{path}: calibration file not found; pass a text or JSONL file with --calibration")
    try:
        raw = path.read_text(encoding="utf-8-sig")  # WikiText's files start with a byte-order mark
    except UnicodeDecodeError as e:
        raise PtekitError(f"{path}: not UTF-8 text ({e}); pass a text or JSONL file") from None
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PtekitError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if isinstance(obj, str):
                texts.append(obj)
            elif isinstance(obj, dict):
                texts.append(obj["text"] if isinstance(obj.get("text"), str)
                             else "\n".join(v for v in obj.values() if isinstance(v, str)))
            else:
                raise PtekitError(f"{path}:{i}: expected an object with a \"text\" field")
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise PtekitError(f"{path}: no text in the calibration file")
    return raw


def token_stream(path: Path, tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(read_text(path)), dtype=torch.long)


def windows(tokens: torch.Tensor, seq_len: int, seed: int, at_least: int = 1,
            source: Path | str = "calibration") -> torch.Tensor:
    """Every non-overlapping window of seq_len tokens, shuffled with `seed`: [count, seq_len]."""
    count = len(tokens) // seq_len
    if count < at_least:
        raise PtekitError(
            f"{source}: {len(tokens)} tokens make only {count} windows of {seq_len}, {at_least} are needed; "
            "pass a longer --calibration file or ask for fewer/shorter samples"
        )
    g = torch.Generator().manual_seed(seed)
    return tokens[: count * seq_len].view(count, seq_len)[torch.randperm(count, generator=g)]


def batch(pool: torch.Tensor, index: int, size: int) -> torch.Tensor:
    """Batch number `index` of `size` windows, cycling through the pool when it runs out."""
    rows = [(index * size + j) % len(pool) for j in range(size)]
    return pool[rows]
