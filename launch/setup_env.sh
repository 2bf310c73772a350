#!/usr/bin/env bash
# Create or refresh the project's virtual environment in .venv (idempotent).
#   - The venv sees the system's site-packages, so a machine that already has torch (a GPU build,
#     e.g. 2.11 with CUDA) keeps it.
#   - Only when no torch imports is torch 2.13.0 installed: on the CPU machines that is the CPU
#     wheel on disk; installing it before the project keeps pip from pulling a CUDA build.
#   - Then the project itself, editable, with its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, twolevel_dist; print(f'twolevel_dist {twolevel_dist.__version__}, torch {torch.__version__}')"
