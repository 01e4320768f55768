"""Quantization-aware training to the spec'd scheme.

`prepare` turns the model's quantized layers into fake-quantized ones (quant.fake_quant): block
linears int4 group 32 with int8 per-token activations, the classifier int8 per channel with int8
per-token activations, the embedding int8 per row. They are subclasses of the layers they replace
and keep the same parameters under the same names, so LoRA wraps them and checkpoints read the same.

The block linears' group scales are set when training starts (`scale` per linear): the
round-to-nearest scales of the starting weights, or the scales a method chose before (GPTQ's, when
qlora starts from a rotated, GPTQ-quantized model: recomputing max-based scales from GPTQ's
dequantized weights would move every group to another grid and undo GPTQ). They stay fixed (a
buffer), or with `learn_scales` train too (a parameter): from GPTQ's dequantized weights, which sit at
the centres of their grid cells, small weight steps change no integer, while a scale moves its whole
group at once. The classifier and the embedding keep scales computed from their weights, as ptq's are.

`convert` gives back the plain layers holding the trained float weights and returns the block
linears' integers on their fixed scales; quant.ptq.apply_scheme quantizes the rest with torchao's
primitives and takes those integers as they are, so what the device gets is what training saw
(tests/test_qlora.py checks this integer for integer).

A tied classifier stays tied through training (both read the one weight); apply_scheme unties it
at the end, as it does for ptq. SpinQuant's online Hadamard (R4) before a down projection is kept:
the activation quantization sees the transformed input, as on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant import fake_quant, scheme
from quant.hadamard import HadamardInputLinear


class FakeQuantLinear(nn.Linear):
    """A quantized linear during training: its input and weight go through the scheme's rounding."""

    def __init__(self, in_features: int, out_features: int, hadamard: nn.Module | None = None,
                 scale: torch.Tensor | None = None, learn_scale: bool = False):
        with torch.device("meta"):
            super().__init__(in_features, out_features, bias=False)
        self.hadamard = hadamard
        # None: the classifier (int8 per channel, scales from the weight); else int4 on these scales.
        if learn_scale and scale is not None:
            self.scale = nn.Parameter(scale.clone())  # its own storage: training must not write the caller's
        else:
            self.register_buffer("scale", scale)

    @classmethod
    def wrap(cls, linear: nn.Linear, scale: torch.Tensor | None = None, learn_scale: bool = False) -> FakeQuantLinear:
        new = cls(linear.in_features, linear.out_features, getattr(linear, "hadamard", None), scale, learn_scale)
        new.weight = linear.weight
        return new

    def fake_quantized_weight(self) -> torch.Tensor:
        if self.scale is None:
            return fake_quant.classifier_weight(self.weight)
        return fake_quant.block_weight_on_grid(self.weight, self.scale)

    def int4(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(integers, scales) of the block linear's weight, as the forward pass rounds it."""
        from quant.gptq import round_to_grid

        w = self.weight.detach().float().reshape(self.out_features, -1, scheme.GROUP_SIZE)
        q = round_to_grid(w, self.scale.float()[..., None]).reshape(self.weight.shape).to(torch.int8)
        return q, self.scale.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard is not None:
            x = self.hadamard(x)
        return F.linear(fake_quant.act(x), self.fake_quantized_weight())

    def plain(self) -> nn.Linear:
        """The layer it replaced (an R4 down projection stays one), holding the trained weight."""
        if self.hadamard is not None:
            new = HadamardInputLinear.wrap(self)
            new.hadamard = self.hadamard
        else:
            with torch.device("meta"):
                new = nn.Linear(self.in_features, self.out_features, bias=False)
            new.weight = self.weight
        return new


class FakeQuantEmbedding(nn.Embedding):
    """Looks rows up, then rounds them as the int8 per-row table will (only the rows a batch uses)."""

    @classmethod
    def wrap(cls, emb: nn.Embedding) -> FakeQuantEmbedding:
        with torch.device("meta"):
            new = cls(emb.num_embeddings, emb.embedding_dim)
        new.weight = emb.weight
        return new

    def fake_quantized_weight(self) -> torch.Tensor:
        return fake_quant.embedding_rows(self.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return fake_quant.embedding_rows(F.embedding(tokens, self.weight))

    def plain(self) -> nn.Embedding:
        with torch.device("meta"):
            new = nn.Embedding(self.num_embeddings, self.embedding_dim)
        new.weight = self.weight
        return new


def prepare(model: nn.Module, scales: dict[str, torch.Tensor] | None = None, learn_scales: bool = False) -> nn.Module:
    """Fake-quantizes the model in place, exactly as the scheme will quantize it. `scales`: the
    block linears' group scales by name (default: round to nearest of the current weights);
    `learn_scales`: they become parameters (named `<linear>.scale`) that train with the weights."""
    from quant.gptq import group_scales

    scheme.check_group_divisible(model)
    scales = scales or {}
    for name, lin in scheme.block_linears(model).items():
        scale = scales[name] if name in scales else group_scales(lin.weight.detach())
        _replace(model, name, FakeQuantLinear.wrap(lin, scale.float().to(lin.weight.device), learn_scales))
    model.output = FakeQuantLinear.wrap(model.output)
    model.tok_embeddings = FakeQuantEmbedding.wrap(model.tok_embeddings)
    return model


def learned_scales(model: nn.Module) -> list[nn.Parameter]:
    """The block linears' group scales that train (prepare's learn_scales); empty when they are fixed."""
    return [m.scale for m in model.modules() if isinstance(m, FakeQuantLinear) and isinstance(m.scale, nn.Parameter)]


def convert(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Back to plain nn.Linear / nn.Embedding holding the trained float weights (in place); returns
    the block linears' (integers, scales) by name, for quant.ptq.apply_scheme."""
    int4 = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, (FakeQuantLinear, FakeQuantEmbedding)):
            if isinstance(m, FakeQuantLinear) and m.scale is not None:
                int4[name] = m.int4()
            _replace(model, name, m.plain())
    return int4


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
