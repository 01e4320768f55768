"""LoRA adapters around the linear layers of the transformer blocks.

Each adapted linear becomes a `LoRALinear` that keeps the original layer as `base` and adds
`lora_a` (in -> rank) and `lora_b` (rank -> out): y = base(x) + scale * lora_b(lora_a(x)).
The names matter: `quant.scheme.block_linears` skips every module whose name contains ".lora_",
so when the scheme is applied the `base` linears become 8da4w and the adapters stay float.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_RANK = 16
DEFAULT_SCALE = 2.0


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int, scale: float):
        super().__init__()
        self.base = base
        self.rank, self.scale = rank, scale
        self.lora_a = nn.Linear(in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_features, bias=False)
        # PEFT's initialisation: A random, B zero, so the adapted model starts equal to the base.
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The branch sees the unquantized activation: on the device it is a separate float GEMM
        # next to the 8da4w one, not part of it.
        branch = self.lora_b(self.lora_a(x))
        return self.base(x) + (branch if self.scale == 1 else self.scale * branch)

    @torch.no_grad()
    def fold_scale(self) -> None:
        """scale * B(A(x)) = (scale * B)(A(x)): the scale goes into lora_b, so the lowered graph has
        one multiplication fewer per adapted linear (exact for a power-of-two scale such as the default)."""
        self.lora_b.weight.mul_(self.scale)
        self.scale = 1.0


def adapted_names(model: nn.Module) -> list[str]:
    """The linear layers that get adapters: every linear in the transformer blocks."""
    from quant.scheme import block_linears

    return [name for name in block_linears(model) if not name.endswith(".base")]


def add_lora(model: nn.Module, rank: int = DEFAULT_RANK, scale: float = DEFAULT_SCALE) -> nn.Module:
    """Wraps every block linear in a LoRALinear (in place); the adapters take the base's device."""
    for name in adapted_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        w = base.weight
        lora = LoRALinear(base, base.in_features, base.out_features, rank, scale).to(device=w.device)
        setattr(parent, child, lora)
    return model


def fold_scales(model: nn.Module) -> nn.Module:
    """Every adapter's scale into its lora_b (in place), before lowering."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.fold_scale()
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".lora_" in name]

