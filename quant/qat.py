"""Quantization-aware training to the spec'd scheme, through torchao's QAT API.

`prepare` swaps the modules for torchao's fake-quantized ones, configured from quant.scheme:
block linears 8da4w group 32, the classifier 8-bit per channel with 8-bit per-token
activations, the embedding 8-bit per row. `convert` swaps them back to plain modules holding the
trained float weights; quant.ptq.apply_scheme then quantizes those with the same torchao
primitives, so the integers and scales the device gets are the ones training saw (the tests
check this integer for integer).

A tied classifier stays tied through training (both fake quantizers read the one weight);
apply_scheme unties it at the end, as it does for ptq.
"""

from __future__ import annotations

import torch
from torch import nn

from quant import scheme


def embedding_config():
    """8-bit symmetric per row: what quant.embedding.quantize_rows_int8 computes."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    return IntxFakeQuantizeConfig(scheme.EMBEDDING_WEIGHT_DTYPE, "per_channel", is_symmetric=True)


def prepare(model: nn.Module) -> nn.Module:
    """Fake-quantizes the model in place, exactly as the scheme will quantize it."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, QATConfig

    scheme.check_group_divisible(model)
    block = set(scheme.block_linears(model))
    act, weight = scheme.qat_block_linear_configs()
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"),
              filter_fn=lambda m, fqn: fqn in block)
    act, weight = scheme.qat_classifier_configs()
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"),
              filter_fn=lambda m, fqn: fqn == "output")
    model.tok_embeddings = FakeQuantizedEmbedding.from_embedding(model.tok_embeddings, embedding_config())
    return model


def convert(model: nn.Module) -> nn.Module:
    """Back to plain nn.Linear / nn.Embedding holding the trained float weights (in place)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, QATConfig

    quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    if isinstance(model.tok_embeddings, FakeQuantizedEmbedding):
        tied = model.output.weight is model.tok_embeddings.weight
        model.tok_embeddings = model.tok_embeddings.to_embedding()
        if tied:
            model.output.weight = model.tok_embeddings.weight
    return model


def is_prepared(model: nn.Module) -> bool:
    from torchao.quantization.qat import FakeQuantizedLinear

    return any(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def fake_quantized_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the weight as the fake quantizer presents it to the forward pass (for checks)."""
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    out = {}
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding)) and m.weight_fake_quantizer is not None:
                out[name] = m.weight_fake_quantizer(m.weight)
    return out
