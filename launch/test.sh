#!/usr/bin/env bash
# The test command (README, first lines; .ci/run runs exactly this): lint, then the suite on
# each torch version the project supports, each in its own environment:
#   1. torch 2.13.0 (the CPU wheel) in .venv       (launch/setup_env.sh)
#   2. torch 2.11.0, the GPU image's, in a cached environment outside the clone
#      (launch/gpu_image_env.sh: ~/.cache/twolevel_dist, built once per machine, about 5.5 GB)
# Both suites run even if the first fails; the exit code is non-zero if either failed.
# Arguments go to both pytest runs:  bash launch/test.sh -k compile
set -uo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh || exit 1
.venv/bin/ruff check . || exit 1
failed=()
echo "== the suite on $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
.venv/bin/python -m pytest "$@" || failed+=("torch 2.13")
gpu_image_env=$(bash launch/gpu_image_env.sh) || exit 1
echo "== the suite on $("$gpu_image_env/bin/python" -c 'import torch; print("torch", torch.__version__)') ($gpu_image_env)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$gpu_image_env/bin/python" -m pytest "$@" \
    || failed+=("torch 2.11")
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED on: ${failed[*]}"
    exit 1
fi
echo "passed on torch 2.13 and torch 2.11"
