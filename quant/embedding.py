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


def quantize_rows_int8(w: torch.Tensor, rows_per_chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row on its own scale, so rows go in chunks: the fp32 temporaries stay a chunk's size, not
    the vocabulary's (1.6 GB each for Llama 3.2 3B), and the result is the same as in one piece."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    block = (1, w.shape[1])
    qs, scales = [], []
    for chunk in w.split(rows_per_chunk):
        scale, zero = choose_qparams_affine(chunk.float(), MappingType.SYMMETRIC, block, EMBEDDING_WEIGHT_DTYPE)
        qs.append(quantize_affine(chunk.float(), block, scale, zero, EMBEDDING_WEIGHT_DTYPE))
        scales.append(scale.float().reshape(-1))
    return torch.cat(qs), torch.cat(scales)


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
