"""Round to nearest ("ptq"): the scheme applied to the float weights as they are.

Also the final step of every other method: whatever a method changes in the weights, it ends
by calling `apply_scheme`, so there is one place where the scheme meets the model.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.memory import RUNTIME_FLOOR, Need
from quant import scheme
from quant.embedding import Int8Embedding
from quant.gptq import set_int4_weight


def apply_scheme(model: nn.Module, block_weights: dict | None = None) -> nn.Module:
    """The scheme on a float model. block_weights: {linear name: (int4 integers, scales)} a method
    already chose for some block linears (GPTQ, QAT on fixed scales); the rest round to nearest.

    One weight at a time: each is converted to fp32 just before it is quantized and its float
    tensor dropped right after, so a bf16 checkpoint is never held whole in fp32 (3.2 GB more for
    the 1B shape, 12.9 GB for the 3B)."""
    scheme.check_group_divisible(model)
    # The classifier and the embedding first, while little else is resident: their float copies are
    # the largest transients (vocabulary x dim in fp32). Untied first: they are quantized differently.
    if model.output.weight is model.tok_embeddings.weight:
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach())
    _quantize_linear(model.output, scheme.classifier_config())
    model.tok_embeddings = Int8Embedding.from_float(model.tok_embeddings)
    chosen = block_weights or {}
    block = scheme.block_linears(model)
    if unknown := set(chosen) - set(block):
        raise ValueError(f"apply_scheme: weights given for layers that are not block linears: {sorted(unknown)}")
    for name in block:
        linear = model.get_submodule(name)
        if name in chosen:
            set_int4_weight(linear, *chosen[name])  # the method's integers; nothing to round
        else:
            _quantize_linear(linear, scheme.block_linear_config())
    # What is left in float (the norms) computes in fp32.
    for p in model.parameters():
        if type(p) is nn.Parameter and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def _quantize_linear(linear: nn.Linear, config) -> None:
    from torchao.quantization import quantize_

    linear.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
    quantize_(linear, config)


def quantize(model: nn.Module, inputs=None) -> nn.Module:
    return apply_scheme(model)


def memory_need(cfg, parameters: int, inputs=None) -> Need:
    """The quantize stage's peak, estimated from the shape (exporter/memory.py) and fitted to the Llama 3.2 1B
    and 3B shapes' measured peaks (5,096 and 11,561 MiB; BENCHMARKS.md): the checkpoint's mapped bf16 pages
    (2 bytes a parameter, released as the quantized weights replace them) and the 4-bit weights and scales made
    meanwhile, then the classifier in fp32 beside torchao's working copies of it (8 bytes per element)."""
    return Need("quantize (ptq)", int(2.6 * parameters) + 8 * cfg.vocab_size * cfg.dim + RUNTIME_FLOOR)
