"""The benchmark prompt: real WikiText text that tokenizes to exactly N tokens.

Meta's table measures time to first token at a prompt length of 64. A prefix of real text cut at
a token boundary does not always re-tokenize to the same tokens (BPE merges across the cut), so
each candidate is decoded and encoded again and kept only when it comes back identical; the
runner's own count (prompt_tokens in its stats line) is checked again after every run.
"""

from __future__ import annotations

from pathlib import Path

from exporter.defaults import WIKITEXT2_TEST, data_file
from exporter.errors import PtekitError
from exporter.tokenizer import Tokenizer


def default_text() -> Path:
    return data_file(WIKITEXT2_TEST)


def paragraphs(text: str):
    """Body paragraphs, one line each (headings like ' = Title = ' and blank lines skipped)."""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("="):
            yield line


def benchmark_prompt(tokenizer: Tokenizer, n_tokens: int, text_path: Path | None = None) -> str:
    """The first paragraph whose first n_tokens tokens decode to text that encodes back to them."""
    path = Path(text_path) if text_path else default_text()
    if n_tokens < 1:
        raise PtekitError(f"--prompt-len {n_tokens}: must be at least 1")
    if not path.is_file():
        raise PtekitError(f"{path}: benchmark prompt text not found; pass an existing text file")
    for para in paragraphs(path.read_text(encoding="utf-8")):
        ids = tokenizer.encode(para)
        if len(ids) < n_tokens:
            continue
        text = tokenizer.decode(ids[:n_tokens])
        if "\ufffd" in text or text != text.strip():
            continue  # a cut inside a UTF-8 character, or whitespace the shell round trip could blur
        if tokenizer.encode(text) == ids[:n_tokens]:
            return text
    raise PtekitError(f"{path}: no paragraph gives a prompt of exactly {n_tokens} tokens with {tokenizer.path.name}; "
                      "choose a smaller --prompt-len")
