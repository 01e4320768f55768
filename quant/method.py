"""What every quantization method receives besides the model, and the plumbing they share:
`-O key=value` options typed by the method's settings dataclass, presets chosen by device, and
where the method runs.

A method is one module in quant/ with one entry point, `quantize(model, inputs) -> model`,
that ends with the model in the target scheme (or, for bf16, cast to bf16), and one record in
quant/registry.py. A method may also define `memory_need(cfg, parameters, inputs) -> exporter.memory.Need`, its
peak memory estimated from the checkpoint's shape, which the export checks before loading weights.
Whatever a method learns (rotations, adapters, trained weights) it saves
under inputs.work_dir so lowering can be rerun and an interrupted run can resume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import PtekitError

# -O values a boolean setting accepts, for every method alike.
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


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
            self.device = resolve_device("auto")


def parse_options(pairs: list[str] | None) -> dict:
    """["rotation=hadamard", "gptq=false"] -> {"rotation": "hadamard", "gptq": "false"}; the method parses values."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PtekitError(f"--option {pair!r}: expected KEY=VALUE, for example --option rotation=hadamard")
        out[key.strip()] = value.strip()
    return out


def pop_preset(method: str, options: dict, device: str, presets: dict):
    """Takes `preset` out of options and returns that preset (default: "paper" on CUDA, else "cpu")."""
    name = options.pop("preset", None) or ("paper" if str(device).startswith("cuda") else "cpu")
    if name not in presets:
        raise PtekitError(f"{method}: unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]


def option_values(method: str, settings_cls, options: dict) -> dict:
    """{key: value} checked against the settings dataclass's fields and given each field's type.
    Strings (from -O) are parsed; values passed from Python are taken as they are."""
    fields = {f.name: f for f in dataclasses.fields(settings_cls)}
    out = {}
    for key, value in options.items():
        if key not in fields:
            raise PtekitError(f"{method}: unknown option {key!r}; known options: preset, {', '.join(fields)}")
        out[key] = option_value(method, key, value, fields[key].type)
    return out


def option_value(method: str, key: str, value, annotation):
    """One option's value for a field annotated `annotation` ("int", "bool | None", float...)."""
    kind = annotation if isinstance(annotation, str) else annotation.__name__
    kind = kind.split("|")[0].strip()
    if not isinstance(value, str) or kind == "str":
        return value
    if kind == "bool":
        if value.strip().lower() not in BOOLEANS:
            raise PtekitError(f"{method}: option {key}={value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")
        return BOOLEANS[value.strip().lower()]
    try:
        return {"int": int, "float": float}[kind](value)
    except (KeyError, ValueError):
        raise PtekitError(f"{method}: option {key}={value!r} is not {'an' if kind == 'int' else 'a'} {kind}") from None


def without_later_options(settings: dict, added_later: dict) -> dict:
    """settings less each option added after results were saved, where it holds the value that reproduces
    what ran before it existed: those results keep their fingerprint."""
    return {k: v for k, v in settings.items() if not (k in added_later and v == added_later[k])}


def native_bf16(device: str) -> bool:
    """Whether `device` (as resolve_device returns it) multiplies bf16 in hardware: a GPU with bf16, an
    x86 CPU with avx512_bf16 or AMX. Elsewhere PyTorch's bf16 GEMM converts as it goes: on an AVX2
    x86 it runs 5 to 9 times slower than fp32."""
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # not measured on other CPUs: keep PyTorch's own bf16 path there
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_device(device: str) -> str:
    """auto | cpu | cuda[:N] -> where a method runs; a GPU that torch does not see is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise PtekitError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")
        return str(device)
    if device != "cpu":
        raise PtekitError(f"--device {device}: unknown device; use auto, cpu or cuda")
    return "cpu"


def update_with_weights(h, model):
    """Feeds every tensor of the model's state_dict (name, then raw bytes, in name order) to the
    hash h; returns h. What a method's resume fingerprints say about the weights."""
    import torch

    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())
    return h


def weights_hash(model) -> str:
    """The first 16 hex digits of update_with_weights' SHA-256: what names the model's own text
    (quant.sft_data.own_text) for either method."""
    import hashlib

    return update_with_weights(hashlib.sha256(), model).hexdigest()[:16]


# --- resuming ----------------------------------------------------------------------------------
# One policy for everything a method keeps under its work directory (training checkpoints, the
# optimization state, the finished result): it is taken up only by a run with the same fingerprint
# (weights, data, settings), and a run that finds work saved under another fingerprint stops with
# one line naming the directory. It is never discarded or overwritten silently: it can be hours of
# training, and a changed option is as likely a slip as a wish to start over.


def start_over(work_dir: Path) -> str:
    """How to start over, as the command lines offer it: export's work directory is <out>/<method>-work."""
    return (f"delete {work_dir} to start over, or give the run another work directory "
            "(`ptekit export -o OTHER`, `ptekit eval --work-dir OTHER`)")


def stale_work(path: Path, work_dir: Path, keep: str | None = None) -> PtekitError:
    """The error for saved work that this run's fingerprint does not match; keep: how to start over
    from part of it, where a method can."""
    hint = f"; or {keep}" if keep else ""
    return PtekitError(f"{path}: saved by a run with other settings, data or weights; {start_over(work_dir)}{hint}")


def unreadable_work(path: Path, work_dir: Path, why: str) -> PtekitError:
    return PtekitError(f"{path}: cannot be read ({why}); {start_over(work_dir)}")


def check_fingerprint(path: Path, saved: str | None, fingerprint: str, work_dir: Path, keep: str | None = None) -> None:
    """The resume policy above, for work whose fingerprint the method has read from `path`."""
    if saved != fingerprint:
        raise stale_work(path, work_dir, keep)


def load_state(path: Path, fingerprint: str, work_dir: Path) -> dict | None:
    """A torch.save'd dict with a "fingerprint" key, by the resume policy above; None when there is none."""
    import torch

    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise unreadable_work(path, work_dir, type(e).__name__) from None
    if not isinstance(state, dict):
        raise unreadable_work(path, work_dir, f"a {type(state).__name__}, not a saved state")
    check_fingerprint(path, state.get("fingerprint"), fingerprint, work_dir)
    return state
