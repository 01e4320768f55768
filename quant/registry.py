"""Every quantization method, one record each: what the pipeline runs, what the CLI's help says,
and how the bench, the report and the suite label and list it.

A new method is one module in quant/ with `quantize(model, inputs) -> model` (quant/method.py)
and one line in METHODS below. Importing this module imports no method (and no torch): the
records name their modules, loaded on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str  # `--method NAME`, the suite's name, the manifest's "method"
    module: str  # defines quantize(model, inputs) -> model
    label: str  # in bench tables, the report and the chart
    help: str  # one or two sentences for `ptekit export --help`
    trains: bool = False  # optimizes with gradients: runs outside torch.no_grad, takes --steps/--device
    quantized: bool = True  # ends in the scheme (quant/scheme.py); False: the unquantized baseline
    settings: str | None = None  # the module's settings dataclass, whose fields are its -O options
    presets: str | None = None  # the module's {name: settings} presets, chosen by device (quant/method.py)

    def quantize(self) -> Callable:
        return importlib.import_module(self.module).quantize

    def memory_need(self) -> Callable | None:
        """The module's memory_need(cfg, parameters, inputs) -> exporter.memory.Need, when it defines one."""
        return getattr(importlib.import_module(self.module), "memory_need", None)

    def settings_class(self):
        return getattr(importlib.import_module(self.module), self.settings) if self.settings else None

    def preset_table(self) -> dict:
        return getattr(importlib.import_module(self.module), self.presets) if self.presets else {}


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("bf16", "quant.bf16", "BF16", quantized=False, help="unquantized baseline."),
    Method("ptq", "quant.ptq", "PTQ", help="round to nearest into the scheme (4-bit g32 weights + 8-bit dynamic "
           "activations in the blocks, 8-bit classifier and embedding)."),
    Method("spinquant", "quant.spinquant", "SpinQuant", trains=True, settings="Settings", presets="PRESETS",
           help="learned rotations + GPTQ."),
    Method("qlora", "quant.qlora", "QAT+LoRA", trains=True, settings="QLoRASettings", presets="PRESETS",
           help="quantization-aware training + LoRA adapters, starting from spinquant's learned rotations and GPTQ "
           "weights (-O rotation=hadamard: random Hadamard rotations; -O rotation=none: the checkpoint's weights); without --data it distills the BF16 model on text the "
           "model writes itself (recovery, on no particular domain), with --data it also trains cross-entropy "
           "on your data (fine-tuning)."),
)}
BASELINE = "bf16"  # what every comparison is relative to


def get(name: str) -> Method:
    from exporter.errors import PtekitError

    if name not in METHODS:
        raise PtekitError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def label(name: str) -> str:
    """The method's label; an unknown name (an old record) is shown as it is."""
    return METHODS[name].label if name in METHODS else name


def register(method: Method) -> None:
    """Adds a method defined outside this file (a plugin, a test)."""
    METHODS[method.name] = method


def help_text() -> str:
    return " ".join(f"{m.name}: {m.help}" for m in METHODS.values())
