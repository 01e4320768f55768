"""What every quantization method receives besides the model.

A method is one module in quant/ with one entry point, `quantize(model, inputs) -> model`,
that ends with the model in the target scheme (or, for bf16, untouched). Whatever a method
learns (rotations, adapters, trained weights) it saves under inputs.work_dir so lowering can be
rerun and an interrupted run can resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class MethodInputs:
    work_dir: Path  # the method's own artefacts and resume state
    tokenizer: object | None = None  # exporter.tokenizer.Tokenizer
    calibration: Path | None = None  # text or JSONL for calibration/training; None: the method's default
    device: str = "cpu"
    steps: int | None = None  # training/optimization steps; None: the method's default
    seed: int = 0
    options: dict = field(default_factory=dict)  # method-specific flags from the CLI
