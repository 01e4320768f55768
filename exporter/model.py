"""The Llama 3.x decoder, read top to bottom.

Grouped-query attention, RMSNorm, SwiGLU, RoPE with Llama 3 frequency scaling (Meta's
interleaved-pair layout), tied or untied embeddings, and a static KV cache of layout
[batch, max_seq_len, n_kv_heads, head_dim] (the layout ExecuTorch's cache ops use): float in the model's
dtype (fp32; bf16 in a bf16 .pte), or, for a .pte exported with `--kv-cache int8`, int8 with a scale and
zero point per position and head.

Two ways to call it:
- forward(tokens): no cache, causal attention over the whole input; training and evaluation.
- forward(tokens, input_pos): with the cache, tokens occupy positions input_pos[0]...; this is
  what the .pte runs. `use_executorch_ops` (set by exporter.lower) routes the cache update and
  attention through ExecuTorch's custom ops; the eager path computes the same thing in plain torch,
  so this file imports nothing from executorch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from exporter.config import ModelConfig, RopeScaling


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, head_dim]: each frequency twice, for both members of its pair."""
    half = cfg.head_dim // 2
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float64) * 2 / cfg.head_dim))
    if cfg.rope_scaling is not None:
        freqs = _llama3_scaling(freqs, cfg.rope_scaling)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), freqs).repeat_interleave(2, dim=-1)
    return angles.cos().float(), angles.sin().float()


def _llama3_scaling(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Low frequencies are slowed by `factor`, high ones kept, the band between interpolated.
    wavelen = 2 * math.pi / freqs
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = (1 - smooth) * freqs / s.factor + smooth * freqs
    out = torch.where(wavelen > low_wavelen, freqs / s.factor, freqs)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mid, out)


def pair_swap() -> torch.Tensor:
    """The [2, 2] matrix P with (x0, x1) @ P.T = (-x1, x0): RoPE's rotation by 90 degrees, one pair a row.

    As a matmul it stays inside XNNPACK; slicing the pairs apart (a slice of dynamic length)
    would leave the delegate and split every layer's graph in four. One pair a row, not one head a
    row (a [D, D] matrix): on an AVX2-only AMD CPU, XNNPACK's fp32 kernel for the head-wide product
    left the thread pool's worker in a state that made the attention kernel after it run up to 2.4
    times slower (docs/decode-profile.md); the pair-wide product does not, and both are exact.
    """
    return torch.tensor([[0.0, -1.0], [1.0, 0.0]])


class RopeTables(NamedTuple):
    """RoPE's tables for the positions of one forward, in the shapes the attention layers use them in.

    Built once per forward (rope_tables), not in every layer: in the .pte each operator costs time on
    every decoded token however small its tensors, and 30 layers would repeat the same few.
    """

    cos: torch.Tensor  # [S, 1, D]: the same for every head
    sin: torch.Tensor
    qkv_cos: torch.Tensor | None = None  # [S, H + 2 * Hkv, D] for a fused q/k/v output (Attention.use_fused_qkv)
    qkv_sin: torch.Tensor | None = None


def rope_tables(cos: torch.Tensor, sin: torch.Tensor, qkv_heads: torch.Tensor | None = None) -> RopeTables:
    """cos, sin: rows of rope_frequencies ([S, D]); qkv_heads: [H + 2 * Hkv, 1], 1 for q's and k's heads and
    0 for v's (Transformer.rope_qkv_heads), or None when no layer's projections are fused."""
    D = cos.shape[-1]
    cos, sin = cos.view(-1, 1, D), sin.view(-1, 1, D)  # a view, not unsqueeze: XNNPACK delegates it
    if qkv_heads is None:
        return RopeTables(cos, sin)
    # v's heads get cos 1 and sin 0, which leaves them as they are; cos * 1 + 0 and sin * 1 are cos and
    # sin exactly, so q and k get the arithmetic they get unfused.
    return RopeTables(cos, sin, cos * qkv_heads + (1 - qkv_heads), sin * qkv_heads)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, swap: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; cos, sin: [S, 1, D] or [S, H, D] (RopeTables); swap: pair_swap()."""
    B, H, D = x.shape[0], x.shape[2], x.shape[3]
    # Reshapes infer the sequence length (-1): XNNPACK delegates those, not symbolic ones. The linear
    # on the 4-D tensor itself also lowers, without the reshapes, but its XNNPACK payload differed
    # between exports of the same model (docs/decode-profile.md), and exports must be byte-identical.
    swapped = F.linear(x.reshape(B, -1, 2), swap.to(x.dtype)).view(B, -1, H, D)
    out = x * cos + swapped * sin
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("ones", None, persistent=False)  # [1, dim]; Transformer.init_constants shares one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32:  # bf16 models normalize in fp32, as Meta's code does
            return self.forward(x.float()).to(x.dtype)
        # The sum of squares as a linear with one output. XNNPACK delegates a mean only as 4D global
        # pooling, which it wraps in two transposes and two reshapes, and each operator in the .pte costs
        # time on every decoded token however small its tensor. Ones are exact in a bf16 model too.
        ms = F.linear(x.pow(2), self.ones.float()) * (1.0 / x.shape[-1]) + self.eps
        return x * torch.rsqrt(ms) * self.weight


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> int8 values, fp32 scales and int8 zero points [..., 1]: asymmetric over each last-dim row."""
    scales, zero_points = torch.ops.quantized_decomposed.choose_qparams_per_token_asymmetric.default(x, torch.int8)
    xq = torch.ops.quantized_decomposed.quantize_per_token(x, scales, zero_points, -128, 127, torch.int8)
    return xq, scales.to(torch.float32), zero_points.to(torch.int8)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # wq/wk/wv as one linear, set by use_fused_qkv (quant.fuse, when lowering).
        self.register_module("wqkv", None)
        self.use_executorch_ops = False
        self.register_buffer("rope_swap", None, persistent=False)  # Transformer.init_constants shares one
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)
        # The int8 cache's scales (fp32) and zero points (int8), [1, max_seq_len, n_kv_heads, 1].
        for name in ("k_scales", "k_zero_points", "v_scales", "v_zero_points"):
            self.register_buffer(name, None, persistent=False)

    def setup_cache(self, max_seq_len: int, dtype: torch.dtype, kv_cache: str = "fp32"):
        """kv_cache "int8" (ExecuTorch's ops only): each position's key and value of each head as int8
        with its own scale and zero point, a quarter of the fp32 cache's bytes for the attention to read."""
        shape = (1, max_seq_len, self.n_kv_heads, self.head_dim)
        if kv_cache == "int8":
            row = shape[:3] + (1,)
            self.k_cache, self.v_cache = torch.zeros(shape, dtype=torch.int8), torch.zeros(shape, dtype=torch.int8)
            self.k_scales, self.v_scales = torch.ones(row), torch.ones(row)
            self.k_zero_points, self.v_zero_points = torch.zeros(row, dtype=torch.int8), torch.zeros(row, dtype=torch.int8)
            return
        self.k_cache = torch.zeros(shape, dtype=dtype)
        self.v_cache = torch.zeros(shape, dtype=dtype)

    def use_fused_qkv(self, wqkv: nn.Module) -> None:
        """Replaces wq, wk and wv by one module whose output is [q | k | v] (quant.fuse builds it)."""
        self.wqkv = wqkv
        del self.wq, self.wk, self.wv

    def forward(self, x, rope: RopeTables, start: int | None = None):
        # -1 for the sequence: XNNPACK delegates a reshape with one inferred dimension, not a symbolic one.
        B, S, D = x.shape[0], x.shape[1], self.head_dim
        qkv = None
        if self.wqkv is None:
            q = self.wq(x).view(B, -1, self.n_heads, D)
            k = self.wk(x).view(B, -1, self.n_kv_heads, D)
            v = self.wv(x).view(B, -1, self.n_kv_heads, D)
            q, k = apply_rope(q, rope.cos, rope.sin, self.rope_swap), apply_rope(k, rope.cos, rope.sin, self.rope_swap)
        else:
            # RoPE on the fused output as a whole (per-head tables that pass v's heads through), then the
            # split: XNNPACK delegates no slice of a tensor with a dynamic dimension, so splitting first
            # would cut its partition in two, while here the split falls where q, k and v leave the
            # partition anyway (for the cache and the attention).
            qkv = self.wqkv(x).view(B, -1, self.n_heads + 2 * self.n_kv_heads, D)
            qkv = apply_rope(qkv, rope.qkv_cos, rope.qkv_sin, self.rope_swap)
            q, k, v = qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)

        if start is None:
            y = self._attend(q, k, v, mask=None)
        elif self.use_executorch_ops and self.k_cache.dtype == torch.int8:
            y = self._attend_int8_cache(q, k, v, start, qkv)
        elif self.use_executorch_ops:
            torch.ops.llama.update_cache(k, self.k_cache, start)
            torch.ops.llama.update_cache(v, self.v_cache, start)
            y = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start, None, 0, True)
        else:
            if self.k_cache.dtype == torch.int8:
                raise NotImplementedError("the int8 KV cache runs only through ExecuTorch's ops (a lowered .pte)")
            end = start + S
            self.k_cache[:, start:end] = k
            self.v_cache[:, start:end] = v
            # Only the filled positions: the rest are masked anyway, and reading (and, for grouped
            # heads, repeating) the whole cache made eager generation several times slower.
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
            y = self._attend(q, self.k_cache[:, :end].type_as(q), self.v_cache[:, :end].type_as(q), mask)
        return self.wo(y.reshape(B, -1, self.n_heads * self.head_dim))

    def _attend_int8_cache(self, q, k, v, start, qkv=None):
        """ExecuTorch's quantized attention: k and v quantized per position and head into the int8 cache,
        q the same way (the kernel multiplies int8 by int8), the output fp32. The ops and argument order
        are those of executorch's own int8 cache (examples/models/llama/source_transformation)."""
        if qkv is None:
            (qq, qs, qz), (kq, ks, kz), (vq, vs, vz) = (quantize_per_token_int8(t) for t in (q, k, v))
        else:
            # The fused projection's output quantized once, then split: its rows are the same (position,
            # head) rows, and each of the three ops per tensor runs outside XNNPACK on every decoded token.
            heads = [self.n_heads, self.n_kv_heads, self.n_kv_heads]
            (qq, kq, vq), (qs, ks, vs), (qz, kz, vz) = (t.split(heads, dim=2) for t in quantize_per_token_int8(qkv))
        for x, cache in ((kq, self.k_cache), (ks, self.k_scales), (kz, self.k_zero_points),
                         (vq, self.v_cache), (vs, self.v_scales), (vz, self.v_zero_points)):
            torch.ops.llama.update_cache(x, cache, start)
        return torch.ops.llama.custom_quantized_sdpa(
            qq, self.k_cache, self.v_cache, start, None, 0, True, None,
            qz, qs, self.k_zero_points, self.k_scales, self.v_zero_points, self.v_scales)

    def _attend(self, q, k, v, mask):
        """q [B, S, H, D], k and v [B, T, Hkv, D] -> [B, S, H, D]."""
        rep = self.n_heads // self.n_kv_heads
        if mask is None:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
            if rep > 1:
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        # Against a cache (eager decoding), written out with the query heads grouped by the KV
        # head they share: PyTorch's CPU flash-attention kernel for a few query positions, and
        # repeating the cache for every query head, were most of the cost of eager decoding.
        B, S, _, D = q.shape
        qg = q.reshape(B, S, self.n_kv_heads, rep, D)
        scores = torch.einsum("bsgrd,btgd->bgrst", qg, k) * (1.0 / math.sqrt(D))
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.einsum("bgrst,btgd->bsgrd", p, v).reshape(B, S, -1, D)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, rope: RopeTables, start=None):
        h = x + self.attention(self.attention_norm(x), rope, start)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("freqs_cos", None, persistent=False)
        self.register_buffer("freqs_sin", None, persistent=False)
        self.register_buffer("rope_qkv_heads", None, persistent=False)  # rope_tables' qkv_heads
        self.init_constants()
        # The .pte returns only the last position's logits (what a runner samples from);
        # evaluation and training want every position.
        self.last_logits_only = False

    def init_constants(self):
        """(Re)builds the buffers that are computed, not loaded: RoPE tables, the pair swap, the norms' ones."""
        cfg = self.config
        self.freqs_cos, self.freqs_sin = rope_frequencies(cfg)
        heads = torch.ones(cfg.n_heads + 2 * cfg.n_kv_heads, 1)
        heads[cfg.n_heads + cfg.n_kv_heads :] = 0  # v's heads, in a fused [q | k | v] output
        self.rope_qkv_heads = heads
        # One tensor for all layers: one constant in the .pte.
        swap, ones = pair_swap(), torch.ones(1, cfg.dim)
        for layer in self.layers:
            layer.attention.rope_swap = swap
        for norm in self.modules():
            if isinstance(norm, RMSNorm):
                norm.ones = ones

    def rope(self, start: int, length: int) -> RopeTables:
        """RoPE's tables for positions start .. start + length, as the layers take them."""
        fused = any(layer.attention.wqkv is not None for layer in self.layers)
        return rope_tables(self.freqs_cos.narrow(0, start, length), self.freqs_sin.narrow(0, start, length),
                           self.rope_qkv_heads if fused else None)

    def setup_caches(self, dtype: torch.dtype = torch.float32, kv_cache: str = "fp32"):
        for layer in self.layers:
            layer.attention.setup_cache(self.config.max_seq_len, dtype, kv_cache)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        S = tokens.shape[1]
        start = None
        if input_pos is None:
            rope = self.rope(0, S)
        else:
            # One read of the position for the whole network: under export it becomes a single
            # symbolic integer that every layer shares.
            start = input_pos[0].item()
            torch._check(start >= 0)
            torch._check(start + S <= self.config.max_seq_len)
            rope = self.rope(start, S)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, rope, start)
        h = self.norm(h)
        if self.last_logits_only:
            h = h[:, -1:, :]
        return self.output(h).float()
