"""A quantized model as `ptekit eval` runs it eagerly: bf16 GEMMs on weights dequantized once.

torchao's eager linear for the scheme's weights dequantizes the whole weight on every call and
multiplies in fp32; on a CPU with bf16 dot products that is two to three times slower than the
bf16 reference it is compared with, and it made an eager ptq evaluation of SmolLM2 take over 20
minutes. Here each quantized linear keeps its dequantized weight in bf16 (int4 x bf16 group scale
and int8 x fp32 channel scale, rounded once to bf16: 8 significant bits), its input still goes
through torchao's own int8 per-token quantization rule in fp32, and the GEMM runs in bf16. The
rest of the model runs as the bf16 reference does (norms, attention, LoRA branches in bf16; the
int8 embedding keeps its fp32 scales and hands its rows on in bf16), so target and reference are
computed in the same arithmetic and differ by the quantization alone.

How far this moves the figures from torchao's exact fp32 path is measured, not assumed: see
docs/quality.md and tests/test_quality.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant import scheme


class _LastInput:
    """The last activation fake-quantized and its result, shared by a model's linears: wq, wk and
    wv read the same tensor, as do w1 and w3: four quantizations a layer instead of seven."""

    def __init__(self):
        self.key, self.value = None, None

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        # Holding x keeps its identity unique; the version counter (absent on inference tensors,
        # which cannot be changed in place outside inference mode) catches in-place changes.
        version = None if x.is_inference() else x._version
        if self.key is None or self.key[0] is not x or self.key[1] != version:
            self.key, self.value = (x, version), scheme.int8_per_token_fake_quant(x).to(torch.bfloat16)
        return self.value


class Bf16GemmLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantize_input: bool, last: _LastInput,
                 hadamard: nn.Module | None = None):
        super().__init__()
        # SpinQuant's R4 (quant.hadamard.HadamardInputLinear): the online transform of the input,
        # kept in fp32 (its +-1/sqrt(n) entries are not bf16 numbers).
        self.hadamard = hadamard
        self.register_buffer("weight", weight.to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))
        self.quantize_input = quantize_input
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard is not None:
            x = self.hadamard(x.float())
        x = self.last.fake_quant(x) if self.quantize_input else x.to(torch.bfloat16)
        return F.linear(x, self.weight, self.bias)


def _quantized_weight(linear: nn.Module):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    w = getattr(linear, "weight", None)
    return w if isinstance(w, IntxUnpackedToInt8Tensor) else None


class _Bf16Output(nn.Module):
    """The int8 embedding, its rows handed on in bf16 as the bf16 reference's embedding does."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens).to(torch.bfloat16)


def bf16_gemm_view(model: nn.Module) -> tuple[nn.Module, int]:
    """The model, changed in place, in the reference's bf16 arithmetic: every linear holding a
    torchao quantized weight becomes a Bf16GemmLinear, the other float weights (norms, LoRA
    branches) become bf16. Returns (model, how many linears were replaced); with none the model
    is returned as it was."""
    from quant.embedding import Int8Embedding
    from quant.hadamard import OnlineHadamard

    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and _quantized_weight(m) is not None]
    if not targets:
        return model, 0
    last = _LastInput()
    for name, m in targets:
        w = _quantized_weight(m)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            new = Bf16GemmLinear(w.dequantize().float(), m.bias, quantize_input=w.activation_quantization is not None,
                                 last=last, hadamard=getattr(m, "hadamard", None))
        setattr(parent, child, new)
    embeddings = {name: (m, m.scales.clone()) for name, m in model.named_modules() if isinstance(m, Int8Embedding)}
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, Bf16GemmLinear) and m.hadamard is not None:
            m.hadamard = OnlineHadamard(m.hadamard.n)  # rebuilt, not cast back: bf16 already rounded it
    for name, (m, scales) in embeddings.items():
        m.scales = scales  # the 8-bit rows keep their fp32 scales, as in the .pte
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, _Bf16Output(m))
    return model, len(targets)
