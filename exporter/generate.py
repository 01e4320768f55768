"""Text in, text out through a .pte on this machine."""

from __future__ import annotations

from pathlib import Path

from exporter.errors import PtekitError
from exporter.manifest import read_manifest
from exporter.runtime import PteModel
from exporter.tokenizer import Tokenizer


def tokenizer_beside(pte: Path) -> Path:
    m = read_manifest(Path(pte).parent)
    if m and (Path(pte).parent / m["tokenizer"]).exists():
        return Path(pte).parent / m["tokenizer"]
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(pte).parent / name).exists():
            return Path(pte).parent / name
    raise PtekitError(f"{pte}: no tokenizer beside it and none given; pass --tokenizer")


def generate_text(pte: Path, prompt: str, max_new_tokens: int, tokenizer: Path | None = None, chat: bool = True,
                  echo=None) -> str:
    model = PteModel(pte)
    tok = Tokenizer(tokenizer or tokenizer_beside(pte))
    text = tok.chat_prompt(prompt) if chat else prompt
    ids = tok.encode(text, bos=tok.add_bos and not text.startswith("<|begin_of_text|>"))
    eos = set(tok.eos_ids) | set(model.meta("get_eos_ids", []) or [])
    out: list[int] = []
    shown = ""

    def on_token(t):
        nonlocal shown
        out.append(t)
        full = tok.decode(out)
        if echo and not full.endswith("\ufffd"):  # wait for a whole UTF-8 character
            echo(full[len(shown):])
            shown = full

    model.generate(ids, max_new_tokens, eos, on_token)
    return tok.decode(out)
