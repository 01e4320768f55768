"""A llama-architecture GGUF, dequantized into the Hugging Face layout.

config.json, model.safetensors (bf16), tokenizer.json and tokenizer_config.json (with the
chat template). GGUF stores q/k rows in Meta's RoPE order; they are permuted to HF's order here
and back by exporter.checkpoint, so the round trip is exact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from exporter.atomic import atomic_dir
from exporter.checkpoint import meta_to_hf_name, permute_meta_to_hf
from exporter.config import ModelConfig, to_hf_config
from exporter.errors import PtekitError
from exporter.progress import bar as progress_bar

_GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight",
    "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight",
    "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight",
    "ffn_down.weight": "feed_forward.w2.weight",
    "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}


def _meta_name(gguf_name: str) -> str | None:
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        inner = _GGUF_TO_META.get(rest)
        return f"layers.{layer}.{inner}" if inner else None
    return _GGUF_TO_META.get(gguf_name)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError on a bad file
        raise PtekitError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from None


def gguf_config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise PtekitError(f"{path}: GGUF architecture is {arch!r}; ptekit imports 'llama' GGUFs only")
    p = "llama."
    n_heads = int(_field(reader, p + "attention.head_count"))
    dim = int(_field(reader, p + "embedding_length"))
    vocab = _field(reader, p + "vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        dim=dim,
        n_layers=int(_field(reader, p + "block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, p + "attention.head_count_kv", n_heads)),
        vocab_size=int(vocab),
        hidden_dim=int(_field(reader, p + "feed_forward_length")),
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in names,
        head_dim=int(_field(reader, p + "rope.dimension_count", dim // n_heads)),
    )


def gguf_tokenizer_json(reader, path: Path) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json for a GGUF with a gpt2 (byte-level BPE) vocabulary."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise PtekitError(f"{path}: tokenizer type {model!r} is not supported for import; ptekit imports byte-level BPE ('gpt2') GGUFs")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in ("smollm", "starcoder"):
        # These vocabularies split every digit on its own before the byte-level split.
        pre_tok = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in ("default", "gpt2"):
        pre_tok = byte_level
    else:
        raise PtekitError(f"{path}: pre-tokenizer {pre!r} is not supported for import; supported: smollm, starcoder, gpt2")
    control = 3  # llama.cpp's TokenType.CONTROL
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == control
    ]
    tok_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": list(merges),
        },
    }
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    tok_cfg = {
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos] if eos is not None else None,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": int(_field(reader, "llama.context_length", 2048)),
    }
    return tok_json, tok_cfg


def import_gguf(path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes the Hugging Face layout to out_dir atomically; returns out_dir."""
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    path = Path(path)
    if not path.is_file():
        raise PtekitError(f"{path}: no such GGUF file")
    reader = _open(path)
    cfg = gguf_config(reader, path)
    tok_json, tok_cfg = gguf_tokenizer_json(reader, path)
    sd = {}
    for t in progress_bar(reader.tensors, desc="dequantize GGUF", unit="tensor", leave=False):
        meta = _meta_name(t.name)
        if meta is None:
            if t.name == "rope_freqs.weight":
                continue
            raise PtekitError(f"{path}: unexpected tensor {t.name!r} in a llama GGUF")
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise PtekitError(f"{path}: tensor {t.name} uses {t.tensor_type.name}, which gguf cannot dequantize") from None
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape(tuple(int(x) for x in reversed(t.shape)))
        if meta.endswith("attention.wq.weight"):
            w = permute_meta_to_hf(w, cfg.n_heads)
        elif meta.endswith("attention.wk.weight"):
            w = permute_meta_to_hf(w, cfg.n_kv_heads)
        sd[meta_to_hf_name(meta)] = w.to(dtype).contiguous()
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    with atomic_dir(out_dir) as tmp:
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt", "source": path.name})
        hf = to_hf_config(cfg.replace(max_seq_len=tok_cfg["model_max_length"]), bos, eos)
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return Path(out_dir)


def cache_dir() -> Path:
    return Path(os.environ.get("PTEKIT_CACHE", Path.home() / ".cache" / "ptekit"))


def import_gguf_cached(path: Path) -> Path:
    """The HF-layout import of a GGUF, made once per file content and reused."""
    st = Path(path).stat()
    key = hashlib.sha256(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{Path(path).stem}-{key}"
    if not (out / "config.json").exists():
        import_gguf(path, out)
    return out
