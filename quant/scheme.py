"""The target scheme, stated once. Every number of the spec lives here and nowhere else.

- every linear layer in the transformer blocks: 4-bit symmetric weights in groups of 32, with
  8-bit per-token dynamic activations (8da4w);
- the output classifier: 8-bit per-channel weights, 8-bit per-token dynamic activations;
- the token embedding: 8-bit per-channel (per row) weights.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.errors import PtekitError

BLOCK_WEIGHT_DTYPE = torch.int4
GROUP_SIZE = 32
CLASSIFIER_WEIGHT_DTYPE = torch.int8
EMBEDDING_WEIGHT_DTYPE = torch.int8
# XNNPACK stores the scales of group-quantized weights in bf16 (executorch's node_visitor casts
# them when it serializes). Quantizing against bf16 scales from the start makes the eager model,
# GPTQ's error feedback and QAT's fake quantizers hold exactly the numbers the .pte holds.
GROUP_SCALE_DTYPE = torch.bfloat16

NAME = "8da4w-g32 + int8 classifier + int8 embedding"
DESCRIPTION = {
    "block_linears": "int4 weights, symmetric, per group of 32; int8 per-token dynamic activations",
    "classifier": "int8 weights, symmetric, per output channel; int8 per-token dynamic activations",
    "embedding": "int8 weights, symmetric, per row",
}


def int8_per_token_fake_quant(x: torch.Tensor) -> torch.Tensor:
    """torchao's int8 asymmetric per-token quantize-dequantize of x in fp32, bit for bit
    (tests/test_quality.py); SpinQuant's training and the eval view both use it, in five passes instead of its dozen allocating ones: clamping
    round(x/scale) to [-128 - zero, 127 - zero] is its clamp(round(x/scale) + zero, -128, 127) - zero,
    exactly, since zero is an integer."""
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)  # exact in x's dtype; the rest in fp32
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    scale = ((hi - lo) / 255.0).clamp(min=torch.finfo(torch.float32).smallest_normal)
    zero = (-128 - torch.round(lo / scale)).clamp(-128, 127)
    return (x * (1.0 / scale)).round_().clamp_(-128 - zero, 127 - zero).mul_(scale)


def block_linear_config():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerGroup

    return Int8DynamicActivationIntxWeightConfig(
        weight_dtype=BLOCK_WEIGHT_DTYPE, weight_granularity=PerGroup(GROUP_SIZE), weight_scale_dtype=GROUP_SCALE_DTYPE
    )


def classifier_config():
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis

    return Int8DynamicActivationIntxWeightConfig(weight_dtype=CLASSIFIER_WEIGHT_DTYPE, weight_granularity=PerAxis(0))


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the transformer blocks, by name (LoRA branches excluded)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("layers.") and ".lora_" not in name
    }


def check_group_divisible(model: nn.Module) -> None:
    for name, m in block_linears(model).items():
        if m.in_features % GROUP_SIZE:
            raise PtekitError(
                f"{name}: in_features={m.in_features} is not divisible by the group size {GROUP_SIZE}; "
                "this model cannot take the 4-bit group-32 scheme"
            )
