#!/usr/bin/env bash
# Create .venv in the project root and install mdlora into it.
# The CPU build of torch goes in first: a plain `torch` requirement on a machine with nothing
# installed would pull a multi-GB CUDA build. Set TORCH_INDEX_URL to choose another build
# (e.g. https://download.pytorch.org/whl/cu124 on a GPU machine).
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
  else
    .venv/bin/pip install --quiet "torch==2.13.0"
  fi
fi
stamp=".venv/.mdlora-installed${EXTRAS:+-$EXTRAS}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing mdlora${EXTRAS:+[$EXTRAS]} and its dependencies"
  .venv/bin/pip install --quiet -e ".${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
fi
