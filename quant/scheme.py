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
ACTIVATION_DTYPE = torch.int8  # per token, dynamic
# XNNPACK stores the scales of group-quantized weights in bf16 (executorch's node_visitor casts
# them when it serializes). Quantizing against bf16 scales from the start makes the eager model,
# GPTQ's error feedback and QAT's fake quantizers hold exactly the numbers the .pte holds.
GROUP_SCALE_DTYPE = torch.bfloat16

DESCRIPTION = {
    "block_linears": "int4 weights, symmetric, per group of 32; int8 per-token dynamic activations",
    "classifier": "int8 weights, symmetric, per output channel; int8 per-token dynamic activations",
    "embedding": "int8 weights, symmetric, per row",
}


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


def qat_block_linear_configs():
    """(activation, weight) fake-quantization configs matching block_linear_config, for QAT."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(
        BLOCK_WEIGHT_DTYPE, group_size=GROUP_SIZE, is_symmetric=True, scale_precision=GROUP_SCALE_DTYPE
    )
    return act, weight


def qat_classifier_configs():
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(CLASSIFIER_WEIGHT_DTYPE, "per_channel", is_symmetric=True)
    return act, weight


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
