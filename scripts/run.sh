#!/usr/bin/env bash
# The README's main command: set up, then run the default job (local Ray; CPU workers without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m orchestrator run --config "${1:-configs/cpu_default.yaml}" "${@:2}"
