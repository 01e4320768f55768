"""The decoder against ExecuTorch's own Llama Transformer, on the same random weights."""

from __future__ import annotations

import json

import pytest
import torch

from exporter.checkpoint import build_model, load_checkpoint, random_checkpoint, save_meta_checkpoint
from exporter.config import ModelConfig, RopeScaling, preset


def reference_transformer(cfg: ModelConfig, sd: dict, max_seq_len: int):
    """executorch/examples/models/llama's Transformer, no KV cache, fp32."""
    from executorch.examples.models.llama.llama_transformer import construct_transformer
    from executorch.examples.models.llama.model_args import ModelArgs

    args = ModelArgs(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
        vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_dim, norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        use_scaled_rope=cfg.rope_scaling is not None,
        rope_scale_factor=int(cfg.rope_scaling.factor) if cfg.rope_scaling else 8,
        max_seq_len=max_seq_len, max_context_len=max_seq_len, use_kv_cache=False, generate_full_logits=True,
        head_dim=cfg.head_dim,
    )
    ref = construct_transformer(args)
    full = dict(sd)
    full.setdefault("output.weight", sd["tok_embeddings.weight"])
    missing, unexpected = ref.load_state_dict({k: v.float() for k, v in full.items()}, strict=False)
    assert not [m for m in missing if m.endswith(".weight")], missing
    return ref.eval()


CONFIGS = {
    # Llama 3.2 in miniature: GQA, scaled RoPE, tied embeddings.
    "llama32-like": ModelConfig(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, hidden_dim=384,
                                rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True,
                                max_seq_len=256),
    # SmolLM2-like: odd head count, untied output, no scaling.
    "untied": ModelConfig(dim=96, n_layers=3, n_heads=3, n_kv_heads=1, vocab_size=300, hidden_dim=256,
                          rope_theta=100000.0, tie_embeddings=False, max_seq_len=256),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_executorch_reference_meta_layout(tmp_path, name):
    cfg = CONFIGS[name]
    sd = random_checkpoint(cfg, seed=1, dtype=torch.float32)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
              "vocab_size": cfg.vocab_size, "hidden_dim": cfg.hidden_dim, "norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "use_scaled_rope": cfg.rope_scaling is not None,
              "tie_embeddings": cfg.tie_embeddings}
    save_meta_checkpoint(tmp_path, cfg, sd, params)
    model = build_model(load_checkpoint(tmp_path), max_seq_len=cfg.max_seq_len)
    ref = reference_transformer(cfg, sd, cfg.max_seq_len)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        theirs = ref(tokens)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def test_logits_equal_reference_hf_layout(tmp_path):
    """The HF layout (q/k rows permuted for rotate-half RoPE) loads to the same model."""
    from safetensors.torch import save_file

    from exporter.checkpoint import meta_to_hf_tensor
    from exporter.config import to_hf_config

    cfg = CONFIGS["llama32-like"]
    sd = random_checkpoint(cfg, seed=2, dtype=torch.float32)
    hf = {name: v.contiguous() for name, v in (meta_to_hf_tensor(k, v, cfg) for k, v in sd.items())}
    save_file(hf, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(cfg)))
    ck = load_checkpoint(tmp_path)
    assert ck.layout == "hf" and ck.config == cfg.replace(max_seq_len=ck.config.max_seq_len)
    model = build_model(ck, max_seq_len=cfg.max_seq_len)
    ref = reference_transformer(cfg, sd, cfg.max_seq_len)
    tokens = torch.randint(0, cfg.vocab_size, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref(tokens), atol=2e-5, rtol=1e-4)


def test_kv_cache_matches_full_forward():
    cfg = CONFIGS["llama32-like"]
    from exporter.model import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches()
        prefill = model(tokens[:, :16], torch.tensor([0]))
        steps = [model(tokens[:, i : i + 1], torch.tensor([i])) for i in range(16, 24)]
    torch.testing.assert_close(prefill, full[:, :16], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 16:], atol=1e-5, rtol=1e-5)


def test_presets_are_metas_params_json():
    one, three = preset("llama3.2-1b"), preset("llama3.2-3b")
    assert (one.dim, one.n_layers, one.n_heads, one.n_kv_heads, one.hidden_dim, one.vocab_size) == (2048, 16, 32, 8, 8192, 128256)
    assert (three.dim, three.n_layers, three.n_heads, three.n_kv_heads, three.hidden_dim) == (3072, 28, 24, 8, 8192)
    assert one.rope_theta == 500000.0 and one.rope_scaling is not None and one.tie_embeddings
