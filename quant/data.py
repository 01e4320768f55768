"""Text files -> token windows: the one reader of calibration, training and evaluation text.

A file is plain UTF-8 text, or JSONL (a .jsonl/.json name, or a first line that is a JSON object):
one JSON value a line, blank lines skipped. As text (calibration, evaluation) a line is a string,
or an object with a "text" string, a "messages" list of {"role", "content"}, or "prompt" and
"response" strings; the lines are joined with blank lines. Training (quant/sft_data.py) reads the
same lines as records.

For calibration the whole text is tokenized once, as one stream, and cut into non-overlapping
windows; which windows a run uses is drawn from a seed, so a run is reproducible and a resumed
run sees the same batches. default_calibration() is WikiText-2's validation split
(exporter.defaults.CALIBRATION_FILE), the text qlora's train_text=mixed adds to the model's own:
the test split is for evaluation only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exporter.defaults import CALIBRATION_FILE, data_file
from exporter.errors import PtekitError


def default_calibration() -> Path:
    return data_file(CALIBRATION_FILE)


def read_file(path: Path, what: str = "data file", flag: str = "--data") -> str:
    """The file's text (a UTF-8 byte-order mark, as WikiText's files start with, dropped)."""
    path = Path(path)
    if not path.is_file():
        raise PtekitError(f"{path}: {what} not found; pass a text or JSONL file with {flag}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PtekitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); pass a text or JSONL file") from None


def is_jsonl(path: Path, text: str) -> bool:
    if Path(path).suffix in (".jsonl", ".json"):
        return True
    first = next((line for line in text.splitlines() if line.strip()), "")
    if not first.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def jsonl_records(path: Path, text: str, strings: bool = False) -> list[tuple[int, dict | str]]:
    """(line number, object) for every non-blank line; strings: a JSON string is a record too."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PtekitError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        if not isinstance(rec, dict) and not (strings and isinstance(rec, str)):
            raise PtekitError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    return out


def record_text(rec: dict | str, where: str) -> str:
    if isinstance(rec, str):
        return rec
    if isinstance(rec.get("text"), str):
        return rec["text"]
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
        return "\n".join(m["content"] for m in msgs)
    if isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
        return rec["prompt"] + "\n" + rec["response"]
    raise PtekitError(f"{where}: expected an object with a \"text\" string, a \"messages\" list of "
                      "{\"role\", \"content\"}, or \"prompt\" and \"response\" strings")


def read_text(path: Path, what: str = "calibration file", flag: str = "--calibration") -> str:
    """The file as one text: plain text as it is, JSONL lines as text joined with blank lines."""
    raw = read_file(path, what, flag)
    if is_jsonl(path, raw):
        raw = "\n\n".join(record_text(rec, f"{path}:{n}") for n, rec in jsonl_records(path, raw, strings=True))
    if not raw.strip():
        raise PtekitError(f"{path}: no text in the {what}; pass a file with text in it")
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
