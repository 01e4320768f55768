"""The 8-bit per-row embedding.

torchao's quantized tensors cannot express it for ExecuTorch (no out-variant of its
dequantize), so the module holds int8 rows and fp32 scales itself, computed with torchao's
quantization primitives. Eagerly it gathers rows then scales them; when exporting it calls
ExecuTorch's quantized_decomposed::embedding_byte, which computes the same thing on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.scheme import EMBEDDING_WEIGHT_DTYPE


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    block = (1, w.shape[1])
    scale, zero = choose_qparams_affine(w.float(), MappingType.SYMMETRIC, block, EMBEDDING_WEIGHT_DTYPE)
    q = quantize_affine(w.float(), block, scale, zero, EMBEDDING_WEIGHT_DTYPE)
    return q, scale.float().reshape(-1)


class Int8Embedding(nn.Module):
    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", qweight)
        self.register_buffer("scales", scales)
        self.use_executorch_ops = False  # set by exporter.lower

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> Int8Embedding:
        q, s = quantize_rows_int8(emb.weight.detach())
        return cls(q, s)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales[:, None]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.use_executorch_ops:
            return torch.ops.quantized_decomposed.embedding_byte.dtype(
                self.weight, self.scales, None, -128, 127, tokens, dtype=torch.float32
            )
        return self.weight[tokens].float() * self.scales[tokens][..., None]
