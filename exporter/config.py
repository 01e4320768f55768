"""ModelConfig: the shape of a Llama-family decoder, read from the checkpoint's own config.

Two sources: Meta's params.json and Hugging Face's config.json. The presets are Meta's
params.json for Llama 3.2 1B and 3B, and exist for building random-weight models of the real
shape (benchmarks, tests); a real checkpoint always supplies its own numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import PtekitError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency scaling (the "llama3" rope_type)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # the SwiGLU FFN's inner size
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_seq_len: int = 2048  # the KV cache length exported into the .pte
    head_dim: int | None = None  # None: dim // n_heads

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's rule for the FFN size (llama/model.py FeedForward)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# --- validation: the one place a checkpoint's config values are checked, for every layout ---------

SIZE = "a positive integer"
NUMBER = "a positive number"
FLAG = "true or false"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


_KINDS = {
    SIZE: lambda v: _is_int(v) and v > 0,
    NUMBER: lambda v: _is_number(v) and v > 0,
    FLAG: lambda v: isinstance(v, bool),
}


class ConfigReader:
    """Reads one config (params.json, config.json or GGUF metadata): each value is checked as it is
    taken, and an error names the file, the field as that file spells it, and the value."""

    def __init__(self, raw, source: str, what: str, remedy: str = "fix the value or re-download the checkpoint"):
        if not isinstance(raw, dict):
            raise PtekitError(f"{source}: expected a JSON object of settings, found {type(raw).__name__}; "
                              f"is this {what}?")
        self.raw, self.source, self.what, self.remedy = raw, source, what, remedy

    def bad(self, key: str, problem: str) -> PtekitError:
        return PtekitError(f"{self.source}: {key} = {self.raw.get(key)!r} {problem}; {self.remedy}")

    def get(self, key: str, kind: str, default=None, required: bool = False):
        """The value of key, checked to be of kind (SIZE, NUMBER, FLAG); default when absent or null."""
        if self.raw.get(key) is None:
            if required:
                raise PtekitError(f"{self.source}: missing key '{key}'; is this {self.what}?")
            return default
        v = self.raw[key]
        if not _KINDS[kind](v):
            raise self.bad(key, f"is not {kind}")
        return v

    def choice(self, key: str, allowed: tuple, default=None):
        v = self.raw.get(key, default)
        if v not in allowed:
            raise self.bad(key, f"is not supported (ptekit handles {', '.join(map(repr, allowed))})")
        return v


def build_config(r: ConfigReader, names: dict[str, str], **values) -> ModelConfig:
    """A ModelConfig from values already read through r, after the checks between fields; names maps
    ModelConfig's field names to the file's own, so an error names what the user can find."""
    cfg = dict(values)
    n = {f: names.get(f, f) for f in ("dim", "n_heads", "n_kv_heads", "head_dim")}

    def disagree(problem: str) -> PtekitError:
        return PtekitError(f"{r.source}: {problem}; {r.remedy}")

    if cfg["n_heads"] % cfg["n_kv_heads"]:
        raise disagree(f"{n['n_heads']} = {cfg['n_heads']} is not a multiple of {n['n_kv_heads']} = {cfg['n_kv_heads']}")
    if cfg.get("head_dim") is None and cfg["dim"] % cfg["n_heads"]:
        raise disagree(f"{n['dim']} = {cfg['dim']} is not a multiple of {n['n_heads']} = {cfg['n_heads']}")
    head_dim = cfg.get("head_dim") or cfg["dim"] // cfg["n_heads"]
    if head_dim % 2:
        # RoPE rotates pairs of a head's channels.
        raise disagree(f"the head size ({n['head_dim']} or {n['dim']} / {n['n_heads']}) is {head_dim}, which is odd; "
                       "rotary embeddings need an even head size")
    return ModelConfig(**cfg)


def from_meta_params(params: dict, source: str = "params.json") -> ModelConfig:
    """Meta's params.json (llama-models layout)."""
    r = ConfigReader(params, source, "Meta's params.json for a Llama model")
    dim = r.get("dim", SIZE, required=True)
    n_heads = r.get("n_heads", SIZE, required=True)
    scaling = None
    if r.get("use_scaled_rope", FLAG, False):
        # Llama 3.2 was released with factor 32 (its HF config says so); params.json
        # does not carry it, so a key of our own may override it for Llama 3.1 (8).
        scaling = RopeScaling(factor=float(r.get("rope_scale_factor", NUMBER, 32.0)))
    hidden_dim = r.get("hidden_dim", SIZE)
    if hidden_dim is None:
        hidden_dim = ffn_hidden_dim(dim, r.get("multiple_of", SIZE, 256), r.get("ffn_dim_multiplier", NUMBER))
    return build_config(
        r, {},
        dim=dim,
        n_layers=r.get("n_layers", SIZE, required=True),
        n_heads=n_heads,
        n_kv_heads=r.get("n_kv_heads", SIZE, n_heads),
        vocab_size=r.get("vocab_size", SIZE, required=True),
        hidden_dim=hidden_dim,
        norm_eps=r.get("norm_eps", NUMBER, 1e-5),
        rope_theta=r.get("rope_theta", NUMBER, 10000.0),
        rope_scaling=scaling,
        # Meta's 3.2 1B/3B checkpoints carry no output.weight: the classifier is the embedding.
        tie_embeddings=r.get("tie_embeddings", FLAG, False),
    )


SUPPORTED_HF_ARCHS = {"LlamaForCausalLM"}
HF_NAMES = {"dim": "hidden_size", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
            "head_dim": "head_dim"}


def from_hf_config(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Hugging Face config.json for LlamaForCausalLM."""
    r = ConfigReader(cfg, source, "a Hugging Face Llama config.json")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        raise r.bad("architectures", "is not a list of class names")
    if cfg.get("model_type") != "llama" and not set(map(str, archs)) & SUPPORTED_HF_ARCHS:
        raise PtekitError(
            f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
            "ptekit handles Llama-architecture models (LlamaForCausalLM)"
        )
    r.choice("hidden_act", ("silu",), default="silu")  # the SwiGLU FFN ptekit builds
    scaling = None
    rs = cfg.get("rope_scaling")
    if rs:
        if not isinstance(rs, dict):
            raise r.bad("rope_scaling", "is not an object")
        rr = ConfigReader(rs, f"{source}: rope_scaling", "a Hugging Face Llama config.json")
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "llama3":
            raise PtekitError(
                f"{source}: rope_scaling type {kind!r} is not supported; ptekit implements 'llama3' scaling"
            )
        scaling = RopeScaling(
            factor=float(rr.get("factor", NUMBER, required=True)),
            low_freq_factor=float(rr.get("low_freq_factor", NUMBER, required=True)),
            high_freq_factor=float(rr.get("high_freq_factor", NUMBER, required=True)),
            original_max_position=rr.get("original_max_position_embeddings", SIZE, required=True),
        )
    n_heads = r.get("num_attention_heads", SIZE, required=True)
    return build_config(
        r, HF_NAMES,
        dim=r.get("hidden_size", SIZE, required=True),
        n_layers=r.get("num_hidden_layers", SIZE, required=True),
        n_heads=n_heads,
        n_kv_heads=r.get("num_key_value_heads", SIZE, n_heads),
        vocab_size=r.get("vocab_size", SIZE, required=True),
        hidden_dim=r.get("intermediate_size", SIZE, required=True),
        norm_eps=r.get("rms_norm_eps", NUMBER, 1e-5),
        rope_theta=r.get("rope_theta", NUMBER, 10000.0),
        rope_scaling=scaling,
        tie_embeddings=r.get("tie_word_embeddings", FLAG, False),
        head_dim=r.get("head_dim", SIZE),
    )


def hf_special_ids(cfg: dict, source: str, vocab_size: int) -> dict:
    """bos_token_id and eos_token_id from a config.json (eos may be a list, as in Llama 3's), checked to
    be token ids of the vocabulary; eos_token_id always comes back as a list."""
    r = ConfigReader(cfg, source, "a Hugging Face Llama config.json")
    out = {}
    for key in ("bos_token_id", "eos_token_id"):
        v = cfg.get(key)
        if v is None:
            continue
        ids = v if isinstance(v, list) and key == "eos_token_id" else [v]
        if not ids or not all(_is_int(i) and 0 <= i < vocab_size for i in ids):
            raise r.bad(key, f"is not a token id below the vocab_size {vocab_size}")
        out[key] = ids if key == "eos_token_id" else v
    return out


def to_hf_config(c: ModelConfig, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "intermediate_size": c.hidden_dim,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "torch_dtype": "bfloat16",
    }
    if c.rope_scaling is not None:
        r = c.rope_scaling
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position,
        }
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
    return cfg


# Meta's params.json for Llama 3.2, verbatim (llama-models sku_list), tied embeddings as shipped.
LLAMA32_PARAMS = {
    "llama3.2-1b": {
        "dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
        "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
    "llama3.2-3b": {
        "dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256,
        "ffn_dim_multiplier": 1.0, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
        "use_scaled_rope": True,
    },
}


def preset(name: str) -> ModelConfig:
    if name not in LLAMA32_PARAMS:
        raise PtekitError(f"unknown preset {name!r}; choose one of {', '.join(LLAMA32_PARAMS)}")
    return from_meta_params({**LLAMA32_PARAMS[name], "tie_embeddings": True}, source=name)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PtekitError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PtekitError(f"{path}: not valid JSON ({e}); re-download or fix the file") from None
