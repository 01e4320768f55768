"""Block linears that read the same input, fused into one linear for the .pte: wq/wk/wv and w1/w3.

On the device each dynamically quantized linear is two XNNPACK operators (quantize the activation
per token, then the int8 x int4 GEMM), so a SmolLM2 block runs seven activation quantizations and
seven small GEMMs per token. Stacking the weights of the linears that share an input makes it four
of each, with wider GEMMs that split better across threads.

Exact for the scheme: the int4 groups run along the input dimension, so stacking weight rows keeps
every row's integers and scales as they were, and the per-token activation quantization sees the
same x once instead of three (or two) times. LoRA adapters stay float beside the fused base: their
down-projections stack the same way (one GEMM of rank 3r instead of three of rank r), their
up-projections stay separate. tests/test_export.py compares fused and unfused .pte logits.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.lora import LoRALinear

# (module attribute of the fused linear, the linears it replaces), per block submodule.
SHARED_INPUT = {"attention": ("wqkv", ("wq", "wk", "wv")), "feed_forward": ("w13", ("w1", "w3"))}


def _stack_weights(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The weights stacked along the output dimension, or None when they cannot stack exactly."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    first = weights[0]
    if all(type(w) is torch.Tensor or type(w) is nn.Parameter for w in weights):
        if len({(w.dtype, w.shape[1]) for w in weights}) != 1:
            return None
        return torch.cat([w.detach() for w in weights])
    if not all(isinstance(w, IntxUnpackedToInt8Tensor) for w in weights):
        return None
    same = {(w.target_dtype, tuple(w.block_size), w.dtype, w.activation_quantization, w.shape[1]) for w in weights}
    if len(same) != 1 or first.block_size[0] != 1:
        return None
    return IntxUnpackedToInt8Tensor(
        qdata=torch.cat([w.qdata for w in weights]),
        scale=torch.cat([w.scale for w in weights]),
        zero_point=torch.cat([w.zero_point for w in weights]),
        target_dtype=first.target_dtype,
        block_size=tuple(first.block_size),
        dtype=first.dtype,
        activation_quantization=first.activation_quantization,
    )


def _plain(m: nn.Module) -> bool:
    # Exactly nn.Linear: a subclass (HadamardInputLinear) transforms its input first.
    return type(m) is nn.Linear and m.bias is None


def _linear(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


class FusedLinear(nn.Module):
    """[y_1, y_2, ...] = split(x @ [W_1; W_2; ...]^T), each y_i plus its LoRA branch if it had one."""

    def __init__(self, linear: nn.Linear, sizes: list[int], lora_a: nn.Linear | None = None,
                 lora_b: list[nn.Linear] | None = None):
        super().__init__()
        self.linear, self.sizes = linear, sizes
        self.lora_a = lora_a
        self.lora_b = nn.ModuleList(lora_b) if lora_b else None

    @classmethod
    def of(cls, members: list[nn.Module]) -> FusedLinear | None:
        """The fused form of these linears (plain, or LoRA around plain bases), or None if they do not fuse."""
        if all(_plain(m) for m in members):
            w = _stack_weights([m.weight for m in members])
            return None if w is None else cls(_linear(w), [m.out_features for m in members])
        if all(isinstance(m, LoRALinear) and m.scale == 1 and _plain(m.base) for m in members):
            w = _stack_weights([m.base.weight for m in members])
            a = _stack_weights([m.lora_a.weight for m in members])
            if w is None or a is None:
                return None
            return cls(_linear(w), [m.base.out_features for m in members], _linear(a), [m.lora_b for m in members])
        return None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ys = self.linear(x).split(self.sizes, dim=-1)
        if self.lora_a is None:
            return ys
        branches = self.lora_a(x).split([b.in_features for b in self.lora_b], dim=-1)
        return tuple(y + b(a) for y, b, a in zip(ys, self.lora_b, branches))


def fuse_shared_input_linears(model: nn.Module) -> nn.Module:
    """In place, in every block: wq/wk/wv -> attention.wqkv and w1/w3 -> feed_forward.w13, where
    they fuse exactly (the model then computes what it did); the others are left as they are."""
    for layer in model.layers:
        for sub_name, (fused_name, names) in SHARED_INPUT.items():
            sub = getattr(layer, sub_name)
            if getattr(sub, fused_name, None) is not None:
                continue
            fused = FusedLinear.of([getattr(sub, n) for n in names])
            if fused is None:
                continue
            setattr(sub, fused_name, fused)
            for n in names:
                delattr(sub, n)
    return model
