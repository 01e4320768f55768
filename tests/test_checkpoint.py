"""Loading the three layouts, and one clear error for each kind of bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from exporter.checkpoint import build_model, load_checkpoint, random_checkpoint, save_meta_checkpoint
from exporter.config import ModelConfig
from exporter.errors import PtekitError

SMALL = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=128, max_seq_len=128)
PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "hidden_dim": 128,
          "norm_eps": 1e-5, "rope_theta": 10000.0}


def meta_dir(tmp_path, **param_overrides):
    d = tmp_path / "meta"
    save_meta_checkpoint(d, SMALL, random_checkpoint(SMALL.replace(tie_embeddings=False)), {**PARAMS, **param_overrides})
    return d


def test_meta_layout_loads(tmp_path):
    ck = load_checkpoint(meta_dir(tmp_path))
    assert ck.layout == "meta" and ck.config.dim == 64 and not ck.config.tie_embeddings
    assert build_model(ck)(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 256)


def test_meta_model_parallel_shards_are_joined(tmp_path):
    cfg = SMALL.replace(tie_embeddings=False)
    sd = random_checkpoint(cfg, seed=3)
    d = tmp_path / "mp"
    d.mkdir()
    cat_dim = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
    shards = [{}, {}]
    for k, v in sd.items():
        dim = cat_dim.get(k.split(".")[-2])
        for i in range(2):
            shards[i][k] = v if dim is None else v.chunk(2, dim=dim)[i].clone()
    for i, s in enumerate(shards):
        torch.save(s, d / f"consolidated.0{i}.pth")
    (d / "params.json").write_text(json.dumps(PARAMS))
    ck = load_checkpoint(d)
    for k in sd:
        torch.testing.assert_close(ck.state_dict[k], sd[k])


def test_gguf_import_roundtrip(smollm2_gguf, smollm2_hf):
    """The HF-layout import holds the GGUF's own dequantized values (q/k permuted back exactly)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(smollm2_gguf)
    ck = load_checkpoint(smollm2_hf)
    assert ck.config.dim == 576 and ck.config.n_layers == 30 and ck.config.n_kv_heads == 3 and ck.config.tie_embeddings
    wanted = {"blk.3.attn_q.weight": "layers.3.attention.wq.weight", "blk.7.attn_k.weight": "layers.7.attention.wk.weight",
              "blk.0.ffn_down.weight": "layers.0.feed_forward.w2.weight"}
    for t in reader.tensors:
        if t.name in wanted:
            ref = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(ck.state_dict[wanted[t.name]].shape)
            torch.testing.assert_close(ck.state_dict[wanted[t.name]].float(), ref.to(torch.bfloat16).float())


# --- bad input: one clear error each ----------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(PtekitError, match="no such file or directory"):
        load_checkpoint(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(PtekitError, match="no params.json .* or config.json"):
        load_checkpoint(tmp_path)


def test_corrupt_params_json(tmp_path):
    d = meta_dir(tmp_path)
    (d / "params.json").write_text("{not json")
    with pytest.raises(PtekitError, match="params.json: not valid JSON"):
        load_checkpoint(d)


def test_corrupt_pth(tmp_path):
    d = meta_dir(tmp_path)
    data = (d / "consolidated.00.pth").read_bytes()
    (d / "consolidated.00.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(PtekitError, match="consolidated.00.pth: cannot read PyTorch weights"):
        load_checkpoint(d)


def test_truncated_safetensors(tmp_path, tiny_hf):
    d = tmp_path / "hf"
    shutil.copytree(tiny_hf, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(PtekitError, match="model.safetensors: cannot read safetensors .*truncated or corrupt"):
        load_checkpoint(d)


def test_config_and_weights_disagree(tmp_path):
    d = meta_dir(tmp_path, dim=128)
    with pytest.raises(PtekitError, match="weights and config disagree: .* has shape"):
        build_model(load_checkpoint(d))


def test_unknown_architecture(tmp_path, tiny_hf):
    d = tmp_path / "hf"
    shutil.copytree(tiny_hf, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PtekitError, match="unsupported architecture"):
        load_checkpoint(d)


def test_dims_not_divisible_by_group_size():
    from exporter.model import Transformer
    from quant.ptq import apply_scheme

    with pytest.raises(PtekitError, match="not divisible by the group size 32"):
        apply_scheme(Transformer(SMALL.replace(hidden_dim=100)))


def test_not_a_gguf(tmp_path):
    from exporter.gguf_import import import_gguf

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(PtekitError, match="x.gguf: not a readable GGUF file"):
        import_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_kept_as_stored_quantize_exactly_as_fp32(tmp_path):
    """The export path keeps a bf16 checkpoint memory-mapped and bf16 (build_model dtype=None) and
    quantizes one layer at a time; the result must be the quantization of the fp32 model, bit for bit."""
    from quant.ptq import apply_scheme

    cfg = SMALL.replace(tie_embeddings=True)
    d = tmp_path / "tied"
    save_meta_checkpoint(d, cfg, random_checkpoint(cfg, seed=5), {**PARAMS})
    stored = load_checkpoint(d)
    model = build_model(stored, dtype=None)
    emb = stored.state_dict["tok_embeddings.weight"]
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.tok_embeddings.weight.data_ptr() == emb.data_ptr()  # shared with the checkpoint: no copy
    assert stored.parameters == sum(t.numel() for t in stored.state_dict.values())
    stored.release_weights()
    assert stored.state_dict == {} and stored.parameters > 0
    streamed = apply_scheme(model)
    assert not [n for n, p in streamed.named_parameters() if p.dtype == torch.bfloat16]

    reference = apply_scheme(build_model(load_checkpoint(d)))  # fp32 first, as the whole model
    tokens = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(streamed(tokens), reference(tokens))
