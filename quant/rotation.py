"""Rotations that leave the float network's function unchanged (SpinQuant, Liu et al. 2024).

- fold_norms: every RMSNorm weight moves into the linears that read the normalized stream, so
  the norms become plain x / rms(x), which commutes with any orthogonal matrix.
- R1 (dim x dim) rotates the residual stream: the embedding rows and every block's output
  projections (wo, w2) write x R1; every block's input projections (wq, wk, wv, w1, w3) and the
  classifier read it back with R1^T.
- R2 (head_dim x head_dim, one per layer) rotates each attention head's values: wv writes
  v R2, wo reads R2^T per head. RoPE and the softmax never see it.
- R4 (hidden_dim) is an online Hadamard transform on the input of each FFN down projection
  (quant.hadamard.HadamardInputLinear); its inverse is merged into w2.

`rotate_layer` is a pure, differentiable function so the same code merges the final rotations
and computes the rotated weights inside the training loss.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.hadamard import HadamardInputLinear, factor

LAYER_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


def untie(model: nn.Module) -> None:
    if model.output.weight is model.tok_embeddings.weight:
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone())


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Moves every RMSNorm weight into the columns of the linears that read it; norms become 1."""
    untie(model)

    def fold(norm, linears):
        for lin in linears:
            lin.weight.mul_(norm.weight.to(lin.weight.dtype)[None, :])
        norm.weight.fill_(1.0)

    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        fold(layer.attention_norm, (a.wq, a.wk, a.wv))
        fold(layer.ffn_norm, (f.w1, f.w3))
    fold(model.norm, (model.output,))


def r4_supported(hidden_dim: int) -> bool:
    return factor(hidden_dim) is not None


@torch.no_grad()
def insert_r4(model: nn.Module) -> None:
    """Hadamard-transforms each w2's input online and merges the inverse into w2 (w2 <- w2 H)."""
    for layer in model.layers:
        w2 = layer.feed_forward.w2
        new = HadamardInputLinear.wrap(w2)
        new.weight.data = new.hadamard(w2.weight.detach().float()).to(w2.weight.dtype)
        layer.feed_forward.w2 = new


def rotate_layer(w: dict[str, torch.Tensor], r1: torch.Tensor | None, r2: torch.Tensor | None,
                 n_heads: int, n_kv_heads: int, head_dim: int) -> dict[str, torch.Tensor]:
    """One block's linear weights (keys as LAYER_LINEARS, nn.Linear layout [out, in]) rotated."""
    out = dict(w)
    if r2 is not None:
        wv = out["attention.wv"].reshape(n_kv_heads, head_dim, -1)
        out["attention.wv"] = (r2.t() @ wv).reshape(n_kv_heads * head_dim, -1)
        wo = out["attention.wo"].reshape(-1, n_heads, head_dim)
        out["attention.wo"] = (wo @ r2).reshape(-1, n_heads * head_dim)
    if r1 is not None:
        for name in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3"):
            out[name] = out[name] @ r1
        for name in ("attention.wo", "feed_forward.w2"):
            out[name] = r1.t() @ out[name]
    return out


def layer_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.get_submodule(name).weight for name in LAYER_LINEARS}


@torch.no_grad()
def apply_rotations(model: nn.Module, r1: torch.Tensor | None, r2: torch.Tensor | None) -> None:
    """Merges R1 and the per-layer R2 (stacked [n_layers, hd, hd]) into a folded model, in float64."""
    cfg = model.config
    if r1 is not None:
        r1 = r1.double()
        emb = model.tok_embeddings.weight
        emb.copy_((emb.double() @ r1).to(emb.dtype))
        out = model.output.weight
        out.copy_((out.double() @ r1).to(out.dtype))
    for i, layer in enumerate(model.layers):
        w = {k: v.double() for k, v in layer_weights(layer).items()}
        rot = rotate_layer(w, r1, None if r2 is None else r2[i].double(), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        for name, t in rot.items():
            p = layer.get_submodule(name).weight
            p.copy_(t.to(p.dtype))

