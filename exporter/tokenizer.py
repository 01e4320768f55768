"""Tokenizers, through the same C++ code (pytorch-tokenizers) that ExecuTorch's runner uses on
the phone, so that what ptekit measures on this machine is tokenized exactly as on the device.

tokenizer.json (Hugging Face byte-level BPE) and Llama 3's tiktoken tokenizer.model are
supported. The chat template comes from tokenizer_config.json when there is one, and is
Llama 3's own format for tokenizer.model.
"""

from __future__ import annotations

import json
from pathlib import Path

from exporter.errors import PtekitError

LLAMA3_CHAT = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class Tokenizer:
    def __init__(self, path: str | Path):
        import pytorch_tokenizers as pt

        self.path = Path(path)
        if not self.path.is_file():
            raise PtekitError(f"{self.path}: tokenizer file not found; the checkpoint needs tokenizer.json or tokenizer.model")
        self.chat_template: str | None = None
        self.eos_ids: list[int] = []
        if self.path.suffix == ".json":
            self._cpp = pt.CppHFTokenizer()
            self._load_cpp()
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_file(str(self.path))
            cfg_path = self.path.with_name("tokenizer_config.json")
            cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
            self.chat_template = cfg.get("chat_template")
            self.bos_id = self._token_id(cfg.get("bos_token"))
            eos = self._token_id(cfg.get("eos_token"))
            self.eos_ids = [eos] if eos is not None else []
            # Llama 3's tokenizer.json adds <|begin_of_text|> in its post-processor and its
            # tokenizer_config.json has no add_bos_token: what encoding "" yields says it.
            self.add_bos = bool(cfg.get("add_bos_token", self.bos_id is not None and self._hf.encode("").ids == [self.bos_id]))
        else:
            self._cpp = pt.CppTiktoken()
            self._load_cpp()
            self._hf = None
            self.chat_template = LLAMA3_CHAT
            self.bos_id = self._cpp.bos_tok()
            # Meta's llama3 tokenizer's stop tokens: <|end_of_text|>, <|eom_id|> (the instruct models end
            # a message with a tool call with it) and <|eot_id|> (the end of a turn).
            self.eos_ids = [self._cpp.eos_tok(), self._encode_special("<|eom_id|>"), self._encode_special("<|eot_id|>")]
            self.add_bos = True

    def _load_cpp(self):
        # A tokenizer.model that is not tiktoken's is most often Llama 2's SentencePiece model.
        hint = ("; ptekit reads Llama 3's tiktoken tokenizer.model, not a SentencePiece one (Llama 2, TinyLlama)"
                if self.path.suffix != ".json" else "; is the file complete?")
        try:
            err = self._cpp.load(str(self.path))
        except Exception as e:
            raise PtekitError(f"{self.path}: cannot load tokenizer ({e}){hint}") from None
        if not self._cpp.is_loaded():
            raise PtekitError(f"{self.path}: cannot load tokenizer ({err}){hint}")

    def _token_id(self, tok) -> int | None:
        if isinstance(tok, dict):
            tok = tok.get("content")
        return None if tok is None else self._hf.token_to_id(tok)

    def _encode_special(self, text: str) -> int:
        ids = self._cpp.encode(text, 0, 0)
        if len(ids) != 1:
            raise PtekitError(f"{self.path}: {text} is not a single special token in this tokenizer")
        return ids[0]

    @property
    def vocab_size(self) -> int:
        return self._cpp.vocab_size()

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self._cpp.encode(text, 0, 0)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + list(ids)

    def decode(self, ids: list[int]) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        from pytorch_tokenizers import TiktokenTokenizer

        if not hasattr(self, "_py_tiktoken"):
            self._py_tiktoken = TiktokenTokenizer(str(self.path))
        return self._py_tiktoken.decode(ids)

    def chat_prompt(self, user_message: str) -> str:
        """The prompt text for one user turn, ending where the assistant's reply begins."""
        if not self.chat_template:
            return user_message
        import jinja2

        env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
        tmpl = env.from_string(self.chat_template)
        return tmpl.render(messages=[{"role": "user", "content": user_message}], add_generation_prompt=True,
                           bos_token="", eos_token="")
