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
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else CPU
    steps: int | None = None  # training/optimization steps; None: the method's default
    seed: int = 0
    options: dict = field(default_factory=dict)  # method-specific flags from the CLI

    def __post_init__(self):
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"


def parse_options(pairs: list[str] | None) -> dict:
    """["rotation=hadamard", "gptq=false"] -> {"rotation": "hadamard", "gptq": "false"}; the method parses values."""
    from exporter.errors import PtekitError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PtekitError(f"--option {pair!r}: expected KEY=VALUE, for example --option rotation=hadamard")
        out[key.strip()] = value.strip()
    return out


def pop_preset(method: str, options: dict, device: str, presets: dict):
    """Takes `preset` out of options and returns that preset (default: "paper" on CUDA, else "cpu")."""
    from exporter.errors import PtekitError

    name = options.pop("preset", None) or ("paper" if str(device).startswith("cuda") else "cpu")
    if name not in presets:
        raise PtekitError(f"{method}: unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]
