"""Checkpoints in, one state dict out.

Three layouts come in: Meta's (params.json + consolidated.*.pth + tokenizer.model), Hugging
Face's (config.json + model.safetensors or sharded safetensors with an index + tokenizer.json),
and a llama-architecture GGUF (converted once to the Hugging Face layout by exporter.gguf_import).
What comes out is a ModelConfig and a state dict in Meta's names, which exporter.model uses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.config import ModelConfig, from_hf_config, from_meta_params, hf_special_ids, read_json
from exporter.errors import PtekitError
from exporter.model import Transformer


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_path: Path | None
    files: list[Path]  # what the weights were read from, for the manifest hash
    layout: str  # "meta" | "hf"
    extra: dict = field(default_factory=dict)  # bos/eos ids, chat template when the config has them
    eos_ids: list[int] = field(default_factory=list)  # end tokens the checkpoint's configs declare
    parameters: int = field(init=False)  # counted at load (the tied classifier once); kept after release_weights

    def __post_init__(self):
        self.parameters = sum(t.numel() for t in self.state_dict.values())

    def release_weights(self) -> None:
        """Drops the checkpoint's references to its tensors once a model holds them (build_model with
        dtype=None), so the method can free each float weight as it quantizes it."""
        self.state_dict = {}

    def stop_ids(self, tokenizer_eos_ids) -> tuple[int, ...]:
        """Every id generation stops on: the configs' declared ids and the tokenizer's eos/eot."""
        return tuple(sorted(set(self.eos_ids) | set(tokenizer_eos_ids)))

    def sha256(self) -> str:
        from exporter.manifest import update_with_file

        h = hashlib.sha256()
        for f in sorted(self.files):
            update_with_file(h, f)
        return h.hexdigest()


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.exists():
        raise PtekitError(f"{path}: no such file or directory; pass a checkpoint directory or a .gguf file")
    if path.is_file() and path.suffix == ".gguf":
        from exporter.gguf_import import import_gguf_cached

        path = import_gguf_cached(path)
    if path.is_file():
        raise PtekitError(
            f"{path}: expected a checkpoint directory (params.json + consolidated.*.pth, or "
            "config.json + *.safetensors) or a .gguf file"
        )
    if (path / "params.json").exists():
        return _load_meta(path)
    if (path / "config.json").exists():
        return _load_hf(path)
    raise PtekitError(
        f"{path}: no params.json (Meta layout) or config.json (Hugging Face layout) here; "
        "point at the folder that holds the checkpoint"
    )


# --- Meta layout -------------------------------------------------------------------------------

# Meta's model-parallel shards split these along dim 0 (column-parallel) or dim 1 (row-parallel).
_META_CAT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def _load_meta(d: Path) -> Checkpoint:
    cfg = from_meta_params(read_json(d / "params.json"), source=str(d / "params.json"))
    shards = sorted(d.glob("consolidated.*.pth"))
    if not shards:
        raise PtekitError(f"{d}: params.json found but no consolidated.*.pth weights next to it")
    parts = [_torch_load(f) for f in shards]
    if len(parts) == 1:
        sd = parts[0]
    else:
        sd = {}
        for name in parts[0]:
            kind = name.split(".")[-2]
            dim = _META_CAT_DIM.get(kind)
            sd[name] = parts[0][name] if dim is None else torch.cat([p[name] for p in parts], dim=dim)
    sd = {k: v for k, v in sd.items() if not k.endswith("rope.freqs")}
    if "output.weight" not in sd:
        cfg = cfg.replace(tie_embeddings=True)
    tok = d / "tokenizer.model"
    return Checkpoint(cfg, sd, tok if tok.exists() else None, shards, "meta")


def _torch_load(f: Path) -> dict:
    try:
        # weights_only: a checkpoint is untrusted input and must not run code when loaded.
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for a damaged zip or pickle
        raise PtekitError(f"{f}: cannot read PyTorch weights ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          "the file may be truncated or not a weights-only checkpoint") from None


# --- Hugging Face layout -----------------------------------------------------------------------

# Hugging Face name <-> Meta name; "{i}" stands for the layer number.
_NAME_PAIRS = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight"),
]
_HF_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def _rename(name: str, src: int) -> str | None:
    for pair in _NAME_PAIRS:
        pattern = re.escape(pair[src]).replace(re.escape("{i}"), r"(?P<i>\d+)")
        m = re.fullmatch(pattern, name)
        if m:
            return pair[1 - src].format(i=m.groupdict().get("i"))
    return None


def hf_to_meta_name(name: str) -> str | None:
    return _rename(name, 0)


def meta_to_hf_name(name: str) -> str:
    hf = _rename(name, 1)
    if hf is None:
        raise KeyError(name)
    return hf


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores q/k rows so RoPE rotates halves; Meta's layout rotates adjacent pairs."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def meta_to_hf_tensor(name: str, w: torch.Tensor, cfg: ModelConfig) -> tuple[str, torch.Tensor]:
    """One tensor of Meta's layout as the HF layout names and stores it (q/k rows permuted)."""
    if name.endswith("attention.wq.weight"):
        w = permute_meta_to_hf(w, cfg.n_heads)
    elif name.endswith("attention.wk.weight"):
        w = permute_meta_to_hf(w, cfg.n_kv_heads)
    return meta_to_hf_name(name), w


def _load_hf(d: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    raw_cfg = read_json(d / "config.json")
    cfg = from_hf_config(raw_cfg, source=str(d / "config.json"))
    extra = hf_special_ids(raw_cfg, str(d / "config.json"), cfg.vocab_size)
    index = d / "model.safetensors.index.json"
    if index.exists():
        idx = read_json(index)
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
            raise PtekitError(f"{index}: no weight_map of tensor names to file names; re-download the checkpoint's index file")
        files = sorted({d / f for f in weight_map.values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise PtekitError(f"{d}: config.json found but no .safetensors weights next to it")
    raw = {}
    for f in files:
        if not f.exists():
            raise PtekitError(f"{f}: listed in the safetensors index but missing; re-download it")
        try:
            raw.update(load_file(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise PtekitError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt, re-download it") from None
    sd = {}
    for name, t in raw.items():
        if _HF_IGNORED.fullmatch(name):
            continue
        meta = hf_to_meta_name(name)
        if meta is None:
            raise PtekitError(f"{d}: unexpected tensor {name!r}; is this a plain LlamaForCausalLM checkpoint?")
        if meta.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = cfg.n_heads if meta.endswith("wq.weight") else cfg.n_kv_heads
            if tuple(t.shape) != (heads * cfg.head_dim, cfg.dim):
                # Checked here, before the RoPE permutation reshapes it by the config's head count.
                raise PtekitError(
                    f"{d}: weights and config disagree: {name} has shape {tuple(t.shape)}, the config implies "
                    f"{(heads * cfg.head_dim, cfg.dim)}; check that config and weights come from the same model")
            t = permute_hf_to_meta(t, heads)
        sd[meta] = t
    tok = next((d / n for n in ("tokenizer.json", "tokenizer.model") if (d / n).exists()), None)
    return Checkpoint(cfg, sd, tok, files, "hf", extra, _declared_eos_ids(d, extra, cfg.vocab_size))


def _declared_eos_ids(d: Path, config_ids: dict, vocab_size: int) -> list[int]:
    """config.json's and generation_config.json's eos_token_id, each one id or a list: Llama 3.1 and
    3.2 Instruct list 128001, 128008 (<|eom_id|>, after a tool call) and 128009 (<|eot_id|>)."""
    ids = set(config_ids.get("eos_token_id", []))
    gen = d / "generation_config.json"
    if gen.exists():
        ids.update(hf_special_ids(read_json(gen), str(gen), vocab_size).get("eos_token_id", []))
    return sorted(ids)


# --- state dict -> model -----------------------------------------------------------------------


def build_model(ckpt: Checkpoint, max_seq_len: int | None = None, dtype=torch.float32) -> Transformer:
    """The Transformer holding the checkpoint's weights, converted to `dtype` (a copy the model owns).

    dtype=None keeps them as stored and shares them with ckpt.state_dict: no copy is made of a
    memory-mapped bf16 checkpoint, and the method converts what it needs when it needs it (ptq one
    layer at a time). The caller then drops ckpt.state_dict so the model holds the only reference.
    """
    cfg = ckpt.config if max_seq_len is None else ckpt.config.replace(max_seq_len=max_seq_len)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = dict(ckpt.state_dict)
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    where = ckpt.files[0].parent if ckpt.files else "checkpoint"
    if missing or unexpected:
        raise PtekitError(
            f"{where}: weights and config disagree: "
            + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else "")
            + "; check that config and weights come from the same model"
        )
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise PtekitError(
                f"{where}: weights and config disagree: {k} has shape {tuple(sd[k].shape)}, "
                f"the config implies {tuple(shape)}; check that config and weights come from the same model"
            )
    # assign: the model takes these tensors as its parameters; nothing is allocated and copied into.
    weights = {k: v if dtype is None else v.to(dtype, copy=True) for k, v in sd.items()}
    model.load_state_dict(weights, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_constants()  # buffers on the meta device were not loaded: rebuild them
    return model.eval()


def random_checkpoint(cfg: ModelConfig, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights of the given shape, in Meta's names (for tests and size benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if cfg.tie_embeddings and k == "output.weight":
            continue
        if k.endswith("norm.weight"):
            sd[k] = (1 + 0.1 * torch.randn(v.shape, generator=g)).to(dtype)
        else:
            sd[k] = (torch.randn(v.shape, generator=g) * v.shape[-1] ** -0.5).to(dtype)
    return sd


def save_meta_checkpoint(d: Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], params: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    torch.save(sd, d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps(params, indent=2))
