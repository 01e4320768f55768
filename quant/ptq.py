"""Round to nearest ("ptq"): the scheme applied to the float weights as they are.

Also the final step of every other method: whatever a method changes in the weights, it ends
by calling `apply_scheme`, so there is one place where the scheme meets the model.
"""

from __future__ import annotations

from torch import nn

from quant import scheme
from quant.embedding import Int8Embedding


def apply_scheme(model: nn.Module, block_weights: dict | None = None) -> nn.Module:
    """The scheme on a float model. block_weights: {linear name: (int4 integers, scales)} a method
    already chose for some block linears (GPTQ, QAT on fixed scales); the rest round to nearest."""
    from torchao.quantization import quantize_

    from quant.gptq import set_int4_weight

    scheme.check_group_divisible(model)
    model = model.float()
    # Untie first: the classifier and the embedding are quantized differently.
    if model.output.weight is model.tok_embeddings.weight:
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone())
    model.tok_embeddings = Int8Embedding.from_float(model.tok_embeddings)
    block = set(scheme.block_linears(model))
    quantize_(model, scheme.block_linear_config(), filter_fn=lambda m, fqn: fqn in block)
    quantize_(model, scheme.classifier_config(), filter_fn=lambda m, fqn: fqn == "output")
    for name, (q, scale) in (block_weights or {}).items():
        set_int4_weight(model.get_submodule(name), q, scale)
    return model


def quantize(model: nn.Module, inputs=None) -> nn.Module:
    return apply_scheme(model)
