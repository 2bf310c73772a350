#!/usr/bin/env bash
# Single node: one rank per GPU (NCCL), or NPROC CPU ranks on gloo when there is no GPU.
#   bash launch/torchrun.sh model=wrn28_10 dataset=cifar10 conv=gc2l groups=4
# Environment: NPROC (ranks; default: the GPU count, else 2), MAX_RESTARTS (default 1: a failed
# rank restarts the job, which resumes from the latest complete checkpoint), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ -z "${NPROC:-}" ]; then
    if [ "$gpus" -gt 0 ]; then NPROC=$gpus; else NPROC=2; fi
fi
if [ "$gpus" -eq 0 ]; then
    # gloo on CPU: one thread per rank, or the ranks fight over the cores.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    --max-restarts="${MAX_RESTARTS:-1}" -m twolevel_dist.train "$@"
