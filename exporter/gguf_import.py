"""A llama-architecture GGUF, dequantized into the Hugging Face layout.

config.json, model.safetensors (bf16), tokenizer.json and tokenizer_config.json (with the
chat template). GGUF stores q/k rows in Meta's RoPE order; they are permuted to HF's order here
and back by exporter.checkpoint, so the round trip is exact.

Llama 3.x GGUFs (as llama.cpp's convert_hf_to_gguf.py writes them) carry the llama3 RoPE scaling
only as a `rope_freqs` tensor of per-frequency divisors; the four scaling parameters are recovered
from it and checked to reproduce every divisor, so a model is never imported with its scaling lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from exporter.atomic import atomic_dir, shared_dir
from exporter.checkpoint import meta_to_hf_tensor
from exporter.config import NUMBER, SIZE, ConfigReader, ModelConfig, RopeScaling, build_config, to_hf_config
from exporter.defaults import cache_dir
from exporter.errors import PtekitError
from exporter.progress import bar as progress_bar

# What users download: float files and llama.cpp's legacy and K-quant block types, all of which the
# gguf package dequantizes exactly (tests/test_llama3_layouts.py imports each one). The i-quants,
# ternary and FP4 types are refused by name rather than imported untested.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# Llama 3's pre-tokenizer split (the `pat_str` of Meta's tiktoken tokenizer, which llama.cpp calls
# "llama-bpe"); its Hugging Face tokenizer.json applies it as a Split before the byte-level mapping.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# The turn and text ends Llama 3.1/3.2's generation_config.json lists (128001, 128008, 128009); a
# GGUF declares only one eos id, and llama.cpp itself stops on these tokens by their text.
LLAMA3_END_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

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


def _f32(x) -> float:
    """A GGUF float is float32: its shortest decimal (1e-05, not 9.99999975e-06) is what the source said."""
    return float(str(np.float32(x)))


def gguf_config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise PtekitError(f"{path}: general.architecture is {arch!r}; ptekit imports 'llama' GGUFs only")
    p = "llama."
    keys = ("attention.head_count", "embedding_length", "block_count", "attention.head_count_kv", "vocab_size",
            "feed_forward_length", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count")
    r = ConfigReader({p + k: _field(reader, p + k) for k in keys}, str(path), "a llama GGUF",
                     "the file is damaged or not a llama model; re-download it")
    n_heads = r.get(p + "attention.head_count", SIZE, required=True)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    head_dim = r.get(p + "rope.dimension_count", SIZE)
    theta = _f32(r.get(p + "rope.freq_base", NUMBER, 10000.0))
    kind = _field(reader, p + "rope.scaling.type", "none")
    if kind != "none":
        raise PtekitError(f"{path}: llama.rope.scaling.type is {kind!r}; ptekit imports unscaled RoPE or "
                          "Llama 3's scaling (a rope_freqs tensor)")
    cfg = build_config(
        r, {"dim": p + "embedding_length", "n_heads": p + "attention.head_count",
            "n_kv_heads": p + "attention.head_count_kv", "head_dim": p + "rope.dimension_count"},
        dim=r.get(p + "embedding_length", SIZE, required=True),
        n_layers=r.get(p + "block_count", SIZE, required=True),
        n_heads=n_heads,
        n_kv_heads=r.get(p + "attention.head_count_kv", SIZE, n_heads),
        vocab_size=r.get(p + "vocab_size", SIZE, len(tokens.data) if tokens is not None else None, required=tokens is None),
        hidden_dim=r.get(p + "feed_forward_length", SIZE, required=True),
        norm_eps=_f32(r.get(p + "attention.layer_norm_rms_epsilon", NUMBER, 1e-5)),
        rope_theta=theta,
        tie_embeddings="output.weight" not in names,
        head_dim=head_dim,
    )
    rope_freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if rope_freqs is None:
        return cfg
    # Checked against the built config's head size, which build_config derives and validates.
    divisors = np.asarray(_dequantize(rope_freqs), dtype=np.float64).reshape(-1)
    orig = int(_field(reader, p + "rope.scaling.original_context_length", 8192))
    scaling = llama3_scaling_from_rope_freqs(divisors, theta, cfg.head_dim, orig, path)
    return dataclasses.replace(cfg, rope_scaling=scaling)


def rope_freq_divisors(s: RopeScaling, theta: float, head_dim: int) -> np.ndarray:
    """What convert_hf_to_gguf.py stores as rope_freqs for llama3 scaling: each frequency's divisor."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    out = np.where(wavelen > s.original_max_position / s.low_freq_factor, s.factor, mid)
    return np.where(wavelen < s.original_max_position / s.high_freq_factor, 1.0, out)


def llama3_scaling_from_rope_freqs(divisors: np.ndarray, theta: float, head_dim: int, orig: int,
                                   path: Path) -> RopeScaling | None:
    """The llama3 scaling parameters that reproduce a GGUF's rope_freqs divisors.

    factor is the largest divisor (the slowed low frequencies). In the band between, each divisor
    gives smooth = (orig / wavelen - low) / (high - low), a line in orig / wavelen whose slope and
    intercept give low and high; with fewer than two such frequencies, Llama 3's low=1, high=4.
    """
    if divisors.shape != (head_dim // 2,):
        raise PtekitError(f"{path}: rope_freqs has {divisors.size} values; head size {head_dim} needs {head_dim // 2}")
    if np.allclose(divisors, 1.0):
        return None
    factor = float(divisors.max())
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    band = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    low, high = 1.0, 4.0
    if band.sum() >= 2:
        x = orig / (2 * math.pi / freqs[band])
        smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x, smooth, 1)
        low = round(float(-intercept / slope), 4)
        high = round(float(low + 1 / slope), 4)
    s = RopeScaling(factor=round(factor, 4), low_freq_factor=low, high_freq_factor=high, original_max_position=orig)
    if not np.allclose(rope_freq_divisors(s, theta, head_dim), divisors, rtol=1e-4, atol=0):
        raise PtekitError(f"{path}: rope_freqs is not Llama 3's RoPE scaling (no factor/low/high fits it); "
                          "ptekit imports unscaled RoPE or llama3 scaling")
    return s


def gguf_tokenizer_json(reader, path: Path) -> tuple[dict, dict]:
    """tokenizer.json and tokenizer_config.json for a GGUF with a gpt2 (byte-level BPE) vocabulary."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        what = " (SentencePiece, as Llama 2 and TinyLlama use)" if model == "llama" else ""
        raise PtekitError(f"{path}: tokenizer.ggml.model is {model!r}{what}; ptekit imports byte-level BPE ('gpt2') "
                          "vocabularies only, such as Llama 3's and SmolLM2's")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    # tiktoken (Llama 3) takes a pre-token that is itself in the vocabulary whole, before any merge;
    # Llama 3's tokenizer.json says so with ignore_merges, and llama.cpp does the same for llama-bpe.
    ignore_merges = False
    if pre == "llama-bpe":
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
        ignore_merges = True
    elif pre in ("smollm", "starcoder"):
        # These vocabularies split every digit on its own before the byte-level split.
        pre_tok = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre in ("default", "gpt2"):
        pre_tok = byte_level
    else:
        raise PtekitError(f"{path}: tokenizer.ggml.pre is {pre!r}, not supported for import; "
                          "supported: llama-bpe, smollm, starcoder, gpt2")
    control, user_defined = 3, 4  # llama.cpp's TokenType
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": ty == control}
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty in (control, user_defined)
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
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
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


def gguf_eos_ids(reader) -> list[int]:
    """The ids generation stops on: the declared eos/eot/eom ids, and for a Llama 3 vocabulary
    (llama-bpe) its three end tokens when they are control tokens."""
    ids = {int(i) for k in ("eos", "eot", "eom") if (i := _field(reader, f"tokenizer.ggml.{k}_token_id")) is not None}
    if _field(reader, "tokenizer.ggml.pre") == "llama-bpe":
        tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
        ids |= {i for i, (t, ty) in enumerate(zip(tokens, types)) if t in LLAMA3_END_TOKENS and ty == 3}
    return sorted(ids)


def _dequantize(t) -> np.ndarray:
    from gguf.quants import dequantize

    return dequantize(t.data, t.tensor_type)


def check_tensor_types(reader, path: Path) -> None:
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise PtekitError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; ptekit imports "
                              f"{', '.join(SUPPORTED_TENSOR_TYPES)}")


def import_gguf(path: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes the Hugging Face layout to out_dir atomically; returns out_dir."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.is_file():
        raise PtekitError(f"{path}: no such GGUF file")
    reader = _open(path)
    check_tensor_types(reader, path)
    cfg = gguf_config(reader, path)
    tok_json, tok_cfg = gguf_tokenizer_json(reader, path)
    sd = {}
    for t in progress_bar(reader.tensors, desc="dequantize GGUF", unit="tensor", leave=False):
        meta = _meta_name(t.name)
        if meta is None:
            if t.name == "rope_freqs.weight":  # read by gguf_config into cfg.rope_scaling
                continue
            raise PtekitError(f"{path}: unexpected tensor {t.name!r} in a llama GGUF")
        arr = _dequantize(t)
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape(tuple(int(x) for x in reversed(t.shape)))
        name, w = meta_to_hf_tensor(meta, w, cfg)
        sd[name] = w.to(dtype).contiguous()
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = gguf_eos_ids(reader)
    with atomic_dir(out_dir) as tmp:
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt", "source": path.name})
        hf = to_hf_config(cfg.replace(max_seq_len=tok_cfg["model_max_length"]), bos,
                          eos[0] if len(eos) == 1 else (eos or None))
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    return Path(out_dir)


def import_gguf_cached(path: Path) -> Path:
    """The HF-layout import of a GGUF, made once per file content and reused."""
    st = Path(path).stat()
    key = hashlib.sha256(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{Path(path).stem}-{key}"
    return shared_dir(out, lambda: import_gguf(path, out))  # two ptekit runs at once import it once
