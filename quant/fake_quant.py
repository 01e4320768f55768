"""The scheme as differentiable fake quantization: quantize-dequantize in the forward pass,
straight-through gradients in the backward pass.

The numbers are the ones torchao's quantized tensors and ExecuTorch compute (tests/test_qlora.py
and tests/test_spinquant.py check them integer for integer); the code is written as few passes over
memory as possible. On one of SmolLM2-135M's FFN linears and an 8 x 512-token batch, forward and
backward in fp32 on 2 cores, the scheme's weight and activation fake quantization take 7.33 ms here
against 11.54 ms through torchao's QAT fake quantizers (torchao.quantization.qat), and the whole step
with its matmul 122.41 against 129.27 ms (2-core AMD EPYC, Zen 4: `python -m
benchmarks.tools.fake_quant_speed`). SpinQuant's rotation training and qlora's QAT both use this.
"""

from __future__ import annotations

import torch

from quant import scheme

_EPS = torch.finfo(torch.float32).eps
INT4 = (-8, 7)
INT8 = (-128, 127)


def symmetric_scales(g: torch.Tensor, qmin: int, qmax: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """torchao's symmetric scale of each group on the last dimension of g [..., groups, size]:
    max |w| / ((qmax - qmin) / 2), rounded to the dtype the .pte stores it in."""
    lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
    return torch.maximum(-lo, hi).div_((qmax - qmin) / 2).clamp_(min=_EPS).to(scale_dtype)


class _FakeQuantWeight(torch.autograd.Function):
    """Symmetric per group of the last dimension; the gradient passes straight through."""

    @staticmethod
    def forward(ctx, w, group_size: int, qmin: int, qmax: int, scale_dtype: torch.dtype):
        g = w.reshape(*w.shape[:-1], -1, group_size)
        scale = symmetric_scales(g, qmin, qmax, scale_dtype)
        # torchao multiplies by the reciprocal taken in the scale's dtype.
        q = g * (1.0 / scale)
        return q.round_().clamp_(qmin, qmax).mul_(scale).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None


class _FakeQuantOnGrid(torch.autograd.Function):
    """Symmetric int4 per group on scales [out, groups]. The weight's gradient passes straight through;
    a scale's (when it trains) holds each weight's integer fixed: d(q * s)/ds = q, summed over the group."""

    @staticmethod
    def forward(ctx, w, scale):
        g = w.reshape(w.shape[0], -1, scheme.GROUP_SIZE)
        s = scale.to(scheme.GROUP_SCALE_DTYPE)[..., None]
        q = g * (1.0 / s).float()  # the reciprocal in the scale's dtype, as torchao's quantize_affine
        q = q.round_().clamp_(*INT4)
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(q.to(torch.int8))
        return q.mul_(s.float()).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[1]:
            return grad, None
        (q,) = ctx.saved_tensors
        grad_scale = (grad.reshape(q.shape).float() * q).sum(-1)
        return grad, grad_scale


class _FakeQuantAct(torch.autograd.Function):
    """int8 asymmetric per token, in fp32 (bf16 cannot hold x / scale to the nearest integer up to 255)."""

    @staticmethod
    def forward(ctx, x):
        return scheme.int8_per_token_fake_quant(x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def act(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit per-token dynamic activation quantization of every quantized linear's input."""
    return _FakeQuantAct.apply(x)


def block_weight(w: torch.Tensor) -> torch.Tensor:
    """A block linear's weight: int4, symmetric, groups of GROUP_SIZE, bf16 scales."""
    return _FakeQuantWeight.apply(w, scheme.GROUP_SIZE, *INT4, scheme.GROUP_SCALE_DTYPE)


def block_weight_on_grid(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A block linear's weight rounded to a fixed grid (the scales a method chose, e.g. GPTQ's)."""
    return _FakeQuantOnGrid.apply(w, scale)


def classifier_weight(w: torch.Tensor) -> torch.Tensor:
    """The classifier's weight: int8, symmetric, per output channel, fp32 scales."""
    return _FakeQuantWeight.apply(w, w.shape[-1], *INT8, torch.float32)


def embedding_rows(rows: torch.Tensor) -> torch.Tensor:
    """Embedding rows (the whole table or the rows a batch looks up): int8 per row, fp32 scales."""
    return _FakeQuantWeight.apply(rows, rows.shape[-1], *INT8, torch.float32)
