#!/usr/bin/env bash
# Installs the project and its dependencies into the current Python.
# Reuses an installed torch (GPU images ship one); on a machine without torch
# and without an NVIDIA driver it asks for the CPU build, so CI never pulls the
# multi-GB CUDA wheels. Set ORCH_TORCH_SPEC to choose another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "${ORCH_TORCH_SPEC:-torch>=2.4}"
  else
    # 2.13.0+cpu is the CPU build on this project's machines; elsewhere add
    # --index-url https://download.pytorch.org/whl/cpu through PIP_INDEX_URL.
    "$PY" -m pip install -q "${ORCH_TORCH_SPEC:-torch==2.13.0}"
  fi
fi
"$PY" -m pip install -q -e ".[test]"
