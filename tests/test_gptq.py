"""GPTQ into the scheme: it beats round-to-nearest where it should, and its integers are the
scheme's torchao weights exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from quant import scheme
from quant.gptq import (
    GPTQOptions,
    HessianAccumulator,
    asymmetric_target,
    dequantize,
    gptq_quantize,
    int4_weight,
    quantize_rtn,
    set_int4_weight,
)


def correlated_inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Activations with the correlated, uneven channels GPTQ exploits (random isotropic ones give it nothing)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    scale = torch.exp(torch.randn(cols, generator=g))
    return (torch.randn(n, cols, generator=g) @ mix) * scale


def output_error(x, w, wq):
    return ((x @ (w - wq).t()) ** 2).mean().item()


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_layer_output(act_order):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g) / 16
    x = correlated_inputs(2048, 256)
    acc = HessianAccumulator(256, "cpu")
    for part in x.split(300):  # the running mean over uneven chunks equals the one-shot Hessian
        acc.add(part)
    torch.testing.assert_close(acc.h, 2 * x.t() @ x / len(x), rtol=1e-4, atol=1e-4)

    q, s = gptq_quantize(w, acc.h, GPTQOptions(act_order=act_order))
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (96, 256 // scheme.GROUP_SIZE)
    assert q.min() >= -8 and q.max() <= 7
    err_gptq = output_error(x, w, dequantize(q, s))
    err_rtn = output_error(x, w, dequantize(*quantize_rtn(w)))
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)


def test_asymmetric_calibration_fits_the_float_layers_output():
    """With inputs already disturbed by earlier quantized layers, the asymmetric target is the least-squares
    fit of the float output (checked against torch.linalg.lstsq), and GPTQ toward it lands closer to the
    float output W x_f than GPTQ toward W."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g) / 12
    x_float = correlated_inputs(4096, 128, seed=3)
    x = x_float + 0.05 * x_float.std() * torch.randn(x_float.shape, generator=g)  # the quantized path's inputs
    acc = HessianAccumulator(128, "cpu", asymmetric=True)
    for a, b in zip(x.split(500), x_float.split(500)):
        acc.add(a, b)
    torch.testing.assert_close(acc.cross, 2 * (x_float - x).t() @ x / len(x), rtol=1e-4, atol=1e-4)

    target = asymmetric_target(w, acc.h, acc.cross, damp=0.0)
    lstsq = torch.linalg.lstsq(x.double(), (x_float @ w.t()).double()).solution.t().float()
    torch.testing.assert_close(target, lstsq, rtol=1e-3, atol=1e-3)

    def float_output_error(wq):
        return ((x @ wq.t() - x_float @ w.t()) ** 2).mean().item()

    plain = dequantize(*gptq_quantize(w, acc.h))
    asym = dequantize(*gptq_quantize(asymmetric_target(w, acc.h, acc.cross, damp=0.01), acc.h))
    assert float_output_error(asym) < 0.9 * float_output_error(plain), (float_output_error(asym), float_output_error(plain))


def test_asymmetric_gptq_model_ends_closer_to_the_float_model():
    """Over a whole (random) network the quantized blocks' errors add up; fitting each layer to the float
    model's output on the inputs it really gets leaves the logits closer to the float model's."""
    import copy

    from exporter.checkpoint import Checkpoint, build_model, random_checkpoint
    from exporter.config import ModelConfig
    from quant.gptq import gptq_model

    cfg = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=256,
                      rope_theta=1e4, tie_embeddings=True, max_seq_len=64)
    model = build_model(Checkpoint(cfg, random_checkpoint(cfg, dtype=torch.float32), None, [], "meta")).float()
    tokens = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)

    def logits_error(asymmetric):
        m = copy.deepcopy(model)
        gptq_model(m, tokens, GPTQOptions(asymmetric=asymmetric), progress=False)
        with torch.no_grad():
            return ((m(tokens) - ref) ** 2).mean().item()

    plain, asym = logits_error(False), logits_error(True)
    assert asym < 0.9 * plain, (asym, plain)


def test_gptq_handles_dead_inputs():
    w = torch.randn(32, 64)
    x = correlated_inputs(512, 64)
    x[:, 5] = 0  # a channel that never fires: its Hessian row is zero
    h = 2 * x.t() @ x / len(x)
    q, s = gptq_quantize(w, h)
    assert torch.isfinite(s).all() and (q[:, 5] == 0).all()


def test_rtn_and_int4_weight_are_torchao_scheme_exactly():
    """Our round-to-nearest equals torchao's for the scheme, and the tensor we build from integers
    and scales is the same kind of weight, computing the same outputs."""
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    ref = nn.Linear(128, 48, bias=False)
    w = ref.weight.detach().clone()
    quantize_(ref, scheme.block_linear_config())
    q, s = quantize_rtn(w)
    assert torch.equal(q, ref.weight.qdata) and torch.equal(s, ref.weight.scale)

    ours = nn.Linear(128, 48, bias=False)
    set_int4_weight(ours, q, s)
    a, b = ours.weight, ref.weight
    assert type(a) is type(b)
    for attr in ("block_size", "target_dtype", "activation_quantization", "dtype", "shape"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.zero_point.dtype == b.zero_point.dtype and torch.equal(a.zero_point, b.zero_point)
    x = torch.randn(3, 7, 128)
    assert torch.equal(ours(x), ref(x))


def test_int4_weight_keeps_gptq_integers():
    w = torch.randn(16, 64)
    x = correlated_inputs(256, 64)
    q, s = gptq_quantize(w, 2 * x.t() @ x / 256)
    t = int4_weight(q, s)
    assert torch.equal(t.qdata, q) and torch.equal(t.scale, s)
    torch.testing.assert_close(t.dequantize(), dequantize(q, s))


def test_scale_search_picks_each_groups_least_error_shrink():
    """searched_group_scales against a plain loop over groups and shrink factors; on Gaussian
    weights it rounds with less squared error than max|w| / 7.5, and GPTQ with act-order uses it when asked."""
    from quant.gptq import group_scales, round_to_grid, searched_group_scales

    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 128, generator=g) / 16
    got = searched_group_scales(w)
    for r in range(6):
        for c in range(4):
            grp = w[r, c * 32:(c + 1) * 32]
            base = (grp.abs().max() / 7.5).to(torch.bfloat16).float()  # the .pte's scales are bf16
            errs = []
            for k in range(21):
                s = (base * (1 - k * 0.2 / 20)).to(torch.bfloat16).float()
                inv = (1 / s.to(torch.bfloat16)).float()  # torchao rounds by the bf16 reciprocal
                errs.append((((grp - torch.clamp(torch.round(grp * inv), -8, 7) * s).abs() ** 2.4).sum().item(), s))
            best = min(errs, key=lambda e: e[0])  # the first of equal errors, as the search keeps
            assert got[r, c].item() == pytest.approx(best[1].item(), rel=1e-6), (r, c)

    w = torch.randn(256, 256, generator=g)

    def sq_err(s):
        grp = w.reshape(256, -1, 32)
        return ((grp - round_to_grid(grp, s[..., None]) * s[..., None]) ** 2).sum().item()

    assert sq_err(searched_group_scales(w)) < 0.95 * sq_err(group_scales(w))
    # With act-order GPTQ fixes the scales up front from the weights: the searched ones, when asked.
    x = correlated_inputs(512, 256)
    _, s = gptq_quantize(w, 2 * x.t() @ x / len(x), GPTQOptions(act_order=True, scale_search=True))
    assert torch.equal(s, searched_group_scales(w))
