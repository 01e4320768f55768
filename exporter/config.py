"""ModelConfig: the shape of a Llama-family decoder, read from the checkpoint's own config.

Two sources: Meta's params.json and Hugging Face's config.json. The presets are Meta's
params.json for Llama 3.2 1B and 3B, and exist for building random-weight models of the real
shape (benchmarks, tests); a real checkpoint always supplies its own numbers.
"""

from __future__ import annotations

import dataclasses
import json
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
        if self.n_heads % self.n_kv_heads:
            raise PtekitError(
                f"config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; "
                "check the checkpoint's config"
            )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
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


def from_meta_params(params: dict, source: str = "params.json") -> ModelConfig:
    """Meta's params.json (llama-models layout)."""
    try:
        dim = params["dim"]
        n_heads = params["n_heads"]
        scaling = None
        if params.get("use_scaled_rope"):
            # Llama 3.2 was released with factor 32 (its HF config says so); params.json
            # does not carry it, so a key of our own may override it for Llama 3.1 (8).
            scaling = RopeScaling(factor=float(params.get("rope_scale_factor", 32.0)))
        return ModelConfig(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=n_heads,
            n_kv_heads=params.get("n_kv_heads") or n_heads,
            vocab_size=params["vocab_size"],
            hidden_dim=params.get("hidden_dim")
            or ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 10000.0),
            rope_scaling=scaling,
            # Meta's 3.2 1B/3B checkpoints carry no output.weight: the classifier is the embedding.
            tie_embeddings=params.get("tie_embeddings", False),
        )
    except KeyError as e:
        raise PtekitError(f"{source}: missing key {e}; is this Meta's params.json for a Llama model?") from None


SUPPORTED_HF_ARCHS = {"LlamaForCausalLM"}


def from_hf_config(cfg: dict, source: str = "config.json") -> ModelConfig:
    """Hugging Face config.json for LlamaForCausalLM."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" and not set(archs) & SUPPORTED_HF_ARCHS:
        raise PtekitError(
            f"{source}: unsupported architecture {archs or cfg.get('model_type')!r}; "
            "ptekit handles Llama-architecture models (LlamaForCausalLM)"
        )
    try:
        scaling = None
        rs = cfg.get("rope_scaling")
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind != "llama3":
                raise PtekitError(
                    f"{source}: rope_scaling type {kind!r} is not supported; ptekit implements 'llama3' scaling"
                )
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position=int(rs["original_max_position_embeddings"]),
            )
        n_heads = cfg["num_attention_heads"]
        return ModelConfig(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            vocab_size=cfg["vocab_size"],
            hidden_dim=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"),
        )
    except KeyError as e:
        raise PtekitError(f"{source}: missing key {e}; is this a Hugging Face Llama config.json?") from None


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
