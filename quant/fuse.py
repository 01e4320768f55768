"""wq, wk and wv fused into one linear for the .pte.

On the device each dynamically quantized linear is two XNNPACK operators (quantize the activation per
token, then the int8 x int4 GEMM). The three projections read the same input, so stacking their weights
makes one quantization and one wider GEMM of three of each (exporter.model.Attention splits the output
after RoPE, where q, k and v leave XNNPACK's partition anyway).

Exact for the scheme: the int4 groups run along the input dimension, so stacking weight rows keeps every
row's integers and scales, and the per-token activation quantization sees the same x. LoRA adapters
stack too: the down-projections along their output (one rank-3r GEMM), the up-projections as one
block-diagonal matrix, whose zeros add nothing. The FFN's w1 and w3 also share an input, but XNNPACK
delegates no slice of a tensor with a dynamic dimension, and their split would fall inside a partition.
tests/test_export.py, test_spinquant.py and test_qlora.py compare fused and unfused .pte logits bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from quant import scheme
from quant.gptq import int4_weight
from quant.lora import LoRALinear


def _stacked(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights stacked along the output dimension, or None when they cannot stack exactly."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    if all(type(w) in (torch.Tensor, nn.Parameter) for w in weights):
        return torch.cat([w.detach() for w in weights]) if len({(w.dtype, w.shape[1]) for w in weights}) == 1 else None
    # The scheme's block weights (quant.scheme.block_linear_config): symmetric int4 in groups along the input.
    if all(isinstance(w, IntxUnpackedToInt8Tensor) and tuple(w.block_size) == (1, scheme.GROUP_SIZE) for w in weights):
        return int4_weight(torch.cat([w.qdata for w in weights]), torch.cat([w.scale for w in weights]))
    return None


def _plain(m: nn.Module) -> bool:
    # Exactly nn.Linear: a subclass (HadamardInputLinear) transforms its input first.
    return type(m) is nn.Linear and m.bias is None


def _linear(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def fused(members: list[nn.Module]) -> nn.Module | None:
    """One module computing the concatenation of the members' outputs, or None if they do not fuse
    exactly: plain linears, or LoRALinears (scale folded) around plain ones."""
    if all(_plain(m) for m in members):
        w = _stacked([m.weight for m in members])
        return None if w is None else _linear(w)
    if not all(isinstance(m, LoRALinear) and m.scale == 1 and _plain(m.base) for m in members):
        return None
    base = _stacked([m.base.weight for m in members])
    down = _stacked([m.lora_a.weight for m in members])
    if base is None or down is None:
        return None
    up = torch.block_diag(*[m.lora_b.weight.detach() for m in members])
    with torch.device("meta"):  # on meta, the adapters' random initialisation draws nothing from the RNG
        out = LoRALinear(nn.Identity(), base.shape[1], base.shape[0], up.shape[1], scale=1.0)
    out.base, out.lora_a, out.lora_b = _linear(base), _linear(down), _linear(up)
    return out


def fuse_qkv(model: nn.Module) -> nn.Module:
    """In place: every block's wq/wk/wv -> attention.wqkv where they fuse exactly (the model then
    computes what it did); attention layers whose projections do not fuse are left as they are."""
    for layer in model.layers:
        attn = layer.attention
        if attn.wqkv is None and (qkv := fused([attn.wq, attn.wk, attn.wv])) is not None:
            attn.use_fused_qkv(qkv)
    return model
