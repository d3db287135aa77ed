#!/usr/bin/env bash
# Create .venv in the project root and install mdlora into it.
# The CPU build of torch goes in first: a plain `torch` requirement on a machine with nothing
# installed would pull a multi-GB CUDA build from PyPI. In order: TORCH_INDEX_URL if set
# (e.g. https://download.pytorch.org/whl/cu128 on a GPU machine); else the 2.13.0+cpu wheel
# from pip's configured indexes / find-links; else PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    .venv/bin/pip install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  elif ! .venv/bin/pip install --quiet "torch==2.13.0+cpu" 2>/dev/null; then
    echo "[setup] no torch 2.13.0+cpu wheel in pip's indexes: trying PyTorch's CPU index"
    .venv/bin/pip install --quiet "torch==2.13.0" \
      --index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple
  fi
fi
stamp=".venv/.mdlora-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing mdlora${EXTRAS:+[$EXTRAS]} and its dependencies"
  .venv/bin/pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
fi
