"""GPTQ (Frantar et al., 2022) into the scheme's 4-bit symmetric group-32 block weights.

GPTQ quantizes one input column at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian H = 2 X^T X of the layer's inputs on
calibration text, so the layer's output on that text moves as little as possible. The integers
and scales it picks are exactly what goes into the .pte: `int4_weight` wraps them in the torchao
tensor that scheme.block_linear_config() would have produced by rounding to nearest, so lowering
sees the same kind of weight either way.

Scales follow torchao's symmetric rule (max|w| / 7.5 over a group of 32, integers in [-8, 7]).
Without act-order a group's scale is taken when GPTQ reaches the group, from the weights as
updated so far (the reference implementation); with act-order the columns are visited by
decreasing Hessian diagonal, which scatters each group, so the scales are fixed up front from the
original weights ("static groups") and groups stay contiguous in the original order, as the
scheme requires.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from exporter.progress import bar as progress_bar
from quant import scheme


def _bounds() -> tuple[int, int]:
    from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS

    return _DTYPE_TO_QVALUE_BOUNDS[scheme.BLOCK_WEIGHT_DTYPE]


def group_scales(w: torch.Tensor, group_size: int = scheme.GROUP_SIZE) -> torch.Tensor:
    """torchao's symmetric scale per group, rounded to the dtype the .pte stores it in: [rows, cols / group_size]."""
    qmin, qmax = _bounds()
    amax = w.float().reshape(w.shape[0], -1, group_size).abs().amax(-1)
    s = torch.clamp(amax / ((qmax - qmin) / 2), min=torch.finfo(torch.float32).eps)
    return s.to(scheme.GROUP_SCALE_DTYPE).float()


def searched_group_scales(w: torch.Tensor, group_size: int = scheme.GROUP_SIZE, steps: int = 20,
                          max_shrink: float = 0.2, norm: float = 2.4) -> torch.Tensor:
    """Per group, the scale max|w| / 7.5 * (1 - k * max_shrink / steps), k = 0..steps, whose
    rounding error sum |w - q s|^norm is least (the reference GPTQ quantizer's `mse` search, with its
    norm 2.4): clipping the largest weight a little can round the other 31 more finely."""
    g = w.float().reshape(w.shape[0], -1, group_size)

    def error(s: torch.Tensor) -> torch.Tensor:
        return (g - round_to_grid(g, s[..., None]) * s[..., None]).abs_().pow_(norm).sum(-1)

    base = group_scales(w, group_size)
    best, best_err = base, error(base)
    for k in range(1, steps + 1):
        s = (base * (1 - k * max_shrink / steps)).to(scheme.GROUP_SCALE_DTYPE).float()
        err = error(s)
        best = torch.where(err < best_err, s, best)  # ties keep the larger scale
        best_err = torch.minimum(err, best_err)
    return best


def round_to_grid(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integers for w given per-element (broadcast) scales, as torchao's quantize_affine rounds
    (it takes the reciprocal in the scale's dtype)."""
    qmin, qmax = _bounds()
    inv = (1.0 / scale.to(scheme.GROUP_SCALE_DTYPE)).float()
    return torch.clamp(torch.round(w * inv), qmin, qmax)


def quantize_rtn(w: torch.Tensor, group_size: int = scheme.GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    s = group_scales(w, group_size)
    q = round_to_grid(w.float().reshape(w.shape[0], -1, group_size), s[..., None])
    return q.reshape(w.shape).to(torch.int8), s


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_size: int = scheme.GROUP_SIZE) -> torch.Tensor:
    return (q.float().reshape(q.shape[0], -1, group_size) * scale[..., None]).reshape(q.shape)


@dataclass(frozen=True)
class GPTQOptions:
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    act_order: bool = False
    block_size: int = 128  # columns per lazy-update block (a multiple of the group size)
    true_sequential: bool = True  # quantize q/k/v, then o, then w1/w3, then w2, each on the previous ones' outputs
    # Each group's scale by searched_group_scales instead of max|w| / 7.5. Off here; spinquant and qlora turn
    # it on (their scale_search and gptq_scale_search options), where after the learned rotations it moved
    # SmolLM2 toward BF16 on WikiText-2 and the docstrings (docs/spinquant.md).
    scale_search: bool = False
    # Asymmetric calibration (GPTAQ, Li et al. 2025): fit each layer's quantized output on the inputs it
    # really gets (after the quantized layers before it) to the float model's output on the float model's
    # inputs, instead of to its own float weights on the quantized inputs (plain GPTQ), so that the error
    # the earlier layers left is corrected instead of carried on. See asymmetric_target.
    asymmetric: bool = False


def calibration_bytes(samples: int, seq_len: int, dim: int, asymmetric: bool) -> int:
    """What gptq_model holds beside the model: the calibration windows' fp32 hidden states, twice with
    asymmetric calibration (the float model's beside the quantized one's). For the memory estimates."""
    return (2 if asymmetric else 1) * samples * seq_len * dim * 4


def damped_hessian(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H with each dead input's (zero) diagonal set to 1 and damp x its mean diagonal added, the dead inputs):
    GPTQ's damping, which keeps H invertible and each column's update small."""
    h = h.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    h += damp * torch.mean(torch.diagonal(h)) * torch.eye(h.shape[0], device=h.device)
    return h, dead


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, opts: GPTQOptions = GPTQOptions(),
                  group_size: int = scheme.GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols], h [cols, cols] -> (int8 integers [rows, cols], scales [rows, cols / group_size])."""
    rows, cols = w.shape
    w = w.clone().float()
    h, dead = damped_hessian(h, opts.damp)
    w[:, dead] = 0
    n_groups = cols // group_size
    scale_of = searched_group_scales if opts.scale_search else group_scales
    scales = torch.zeros(rows, n_groups, device=w.device)
    perm = None
    if opts.act_order:
        scales = scale_of(w, group_size)
        perm = torch.argsort(torch.diagonal(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        group_of = perm // group_size
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros(rows, cols, device=w.device)
    bs = max(group_size, opts.block_size // group_size * group_size)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if perm is None:
                g = col // group_size
                if col % group_size == 0:
                    scales[:, g] = scale_of(w1[:, i : i + group_size], group_size)[:, 0]
            else:
                g = group_of[col]
            s = scales[:, g]
            qc = round_to_grid(w1[:, i], s)
            q[:, col] = qc
            e = (w1[:, i] - qc * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return q.to(torch.int8), scales


@torch.no_grad()
def asymmetric_target(w: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight W' whose output on the quantized inputs x is closest to W's on the float inputs x_f:
    argmin sum |W' x - W x_f|^2 = W + W D H^-1, with H = sum x x^T and D = sum (x_f - x) x^T (H damped as
    GPTQ damps it). Since W' x is the least-squares projection of W x_f, sum |Q x - W x_f|^2 =
    sum |(Q - W') x|^2 + a constant, which is exactly what GPTQ minimises with target W' and Hessian H."""
    w = w.float()
    return w + torch.linalg.solve(damped_hessian(h, damp)[0], cross.float().t() @ w.t()).t()


class HessianAccumulator:
    """H = 2/n sum x x^T over every token a linear layer sees (float32, running mean), and with
    asymmetric calibration D = 2/n sum (x_f - x) x^T, x_f the float model's input at the same token."""

    def __init__(self, cols: int, device, asymmetric: bool = False):
        self.h = torch.zeros(cols, cols, device=device)
        self.cross = torch.zeros(cols, cols, device=device) if asymmetric else None
        self.n = 0

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        keep = self.n / (self.n + m)
        self.h *= keep
        self.n += m
        c = (2.0 / self.n) ** 0.5
        self.h += (x * c).t() @ (x * c)
        if self.cross is not None:
            self.cross *= keep
            self.cross += ((x_float.reshape(x.shape).float() - x) * c).t() @ (x * c)


def int4_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The torchao weight tensor of scheme.block_linear_config() holding these integers and scales."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.quantize_.workflows import IntxPackingFormat

    cfg = scheme.block_linear_config()
    # The fields below are what torchao's handler for this config sets; guard against a scheme
    # change this function would not follow.
    assert isinstance(cfg.weight_granularity, PerGroup) and cfg.intx_packing_format == IntxPackingFormat.UNPACKED_TO_INT8
    assert cfg.weight_scale_dtype == scheme.GROUP_SCALE_DTYPE
    group = cfg.weight_granularity.group_size
    return IntxUnpackedToInt8Tensor(
        qdata=q.to(torch.int8).contiguous(),
        scale=scale.to(scheme.GROUP_SCALE_DTYPE).reshape(q.shape[0], q.shape[1] // group).contiguous(),
        zero_point=torch.zeros(q.shape[0], q.shape[1] // group, dtype=torch.int8, device=q.device),
        target_dtype=cfg.weight_dtype,
        block_size=(1, group),
        dtype=torch.float32,
        activation_quantization="int8_asym_per_token",
    )


def set_int4_weight(linear: nn.Linear, q: torch.Tensor, scale: torch.Tensor) -> None:
    linear.weight = nn.Parameter(int4_weight(q.cpu(), scale.cpu()), requires_grad=False)


# --- the whole network, block by block ----------------------------------------------------------

# Linears that read the same input share one Hessian; the groups in the order a block runs them.
_GROUPS = (("attention.wq", "attention.wk", "attention.wv"), ("attention.wo",),
           ("feed_forward.w1", "feed_forward.w3"), ("feed_forward.w2",))


class _Stop(Exception):
    """Raised by a hook once it has what it came for: the rest of the block need not run."""


def _watch_input(linear: nn.Module, fn) -> torch.utils.hooks.RemovableHandle:
    """Calls fn(x) with the input the linear's matmul actually sees (after its online Hadamard, if any)."""
    had = getattr(linear, "hadamard", None)
    if had is not None:
        return had.register_forward_hook(lambda m, args, out: fn(out))
    return linear.register_forward_pre_hook(lambda m, args: fn(args[0]))


@torch.no_grad()
def gptq_model(model: nn.Module, tokens: torch.Tensor, opts: GPTQOptions, device: str = "cpu",
               micro_batch: int = 8, progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ on every block linear of a float model, block after block, each block seeing the
    outputs of the already-quantized blocks before it. Sets each linear's weight to its dequantized
    value (so the float model now computes what the quantized one will) and returns
    {linear name: (int8 integers, scales)} on the CPU.

    true_sequential: each group of linears gets its Hessian from a pass in which the groups before
    it are already quantized; the pass stops at the group's input, so the four passes cost about
    2.5 block forwards instead of 5 (without it: one pass for all four, then the output pass).
    asymmetric: a float copy of each block runs beside it on the float model's hidden states, and each
    linear's target is asymmetric_target (about twice the forward passes).
    """
    from quant.embedding import Int8Embedding

    cfg = model.config
    model.to(device)
    # The first block sees what the .pte's int8 embedding produces; the float model, its float embedding.
    emb = Int8Embedding.from_float(model.tok_embeddings)
    hs = [emb(t.to(device)).float() for t in tokens.split(micro_batch)]
    hs_float = [model.tok_embeddings(t.to(device)).float() for t in tokens.split(micro_batch)] if opts.asymmetric else None
    S = tokens.shape[1]
    rope = model.rope(0, S)
    stages = [[g] for g in _GROUPS] if opts.true_sequential else [list(_GROUPS)]
    result = {}
    bar = progress_bar(total=cfg.n_layers * len(_GROUPS), desc="GPTQ", unit="group", disable=not progress)
    for i, layer in enumerate(model.layers):
        float_layer = copy.deepcopy(layer) if opts.asymmetric else None
        for groups in stages:
            acc = {g: HessianAccumulator(layer.get_submodule(g[0]).in_features, device, opts.asymmetric)
                   for g in groups}
            for j, h in enumerate(hs):
                xs = _group_inputs(layer, h, rope, groups)
                xs_float = _group_inputs(float_layer, hs_float[j], rope, groups) if opts.asymmetric else {}
                for g in groups:
                    acc[g].add(xs[g], xs_float.get(g))
            for g in groups:
                for name in g:
                    lin = layer.get_submodule(name)
                    w = lin.weight.data
                    if opts.asymmetric:
                        w = asymmetric_target(w, acc[g].h, acc[g].cross, opts.damp)
                    q, s = gptq_quantize(w, acc[g].h, opts)
                    lin.weight.data = dequantize(q, s).to(lin.weight.dtype)
                    result[f"layers.{i}.{name}"] = (q.cpu(), s.cpu())
                bar.update(1)
        hs = [layer(h, rope) for h in hs]
        if opts.asymmetric:
            hs_float = [float_layer(h, rope) for h in hs_float]
    bar.close()
    model.to("cpu")
    return result


def _group_inputs(layer: nn.Module, h: torch.Tensor, rope, groups) -> dict:
    """{group: the input its linears' matmul sees} for one pass of `layer` on h, stopped after the last group."""
    seen, last = {}, groups[-1]

    def record(x, g):
        seen[g] = x
        if g is last:
            raise _Stop

    handles = [_watch_input(layer.get_submodule(g[0]), lambda x, g=g: record(x, g)) for g in groups]
    try:
        layer(h, rope)
    except _Stop:
        pass
    finally:
        for hd in handles:
            hd.remove()
    return seen
