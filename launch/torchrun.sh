#!/usr/bin/env bash
# Single node: one rank per GPU (NCCL), or NPROC CPU ranks on gloo when there is no GPU.
#   bash launch/torchrun.sh model=wrn28_10 dataset=cifar10 conv=gc2l groups=4
# Environment: NPROC (ranks; default: the GPU count, else 2), MAX_RESTARTS (default 1: a failed
# rank restarts the job, which resumes from the latest complete checkpoint), PYTHON.
#
# Exits with the job's own code (twolevel_dist/engine/ending.py), which torchrun itself hides:
# 0 done, 2 refused (never restarted: a restart cannot fix a config error), 3 a rank died or
# hung, 75 stopped by Ctrl-C / SIGTERM / SIGUSR2 with a complete checkpoint (continue with the
# same command and resume=auto run_dir=<the directory the last line names>). The job's one
# line (error: ..., stopped: ...) is printed last, after whatever torchrun reports.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())") || exit 1
if [ -z "${NPROC:-}" ]; then
    if [ "$gpus" -gt 0 ]; then NPROC=$gpus; else NPROC=2; fi
fi
if [ "$gpus" -eq 0 ]; then
    # gloo on CPU: one thread per rank, or the ranks fight over the cores.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
TWOLEVEL_EXIT_FILE=$(mktemp) || exit 1
export TWOLEVEL_EXIT_FILE
trap 'rm -f "$TWOLEVEL_EXIT_FILE"' EXIT
# Stop signals: Ctrl-C reaches torchrun and its workers directly (one process group), and this
# script waits for them; SIGTERM and SIGUSR2 sent to this script are passed on to torchrun as
# SIGTERM, which every torchrun forwards to its workers (not SIGUSR2, whose default action
# would end torchrun itself: it runs with SIGUSR2 ignored; the workers handle it).
trap ':' INT
trap 'kill -TERM "$torchrun" 2>/dev/null' TERM USR2
(trap '' USR2; exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    --max-restarts="${MAX_RESTARTS:-1}" -m twolevel_dist.train "$@") &
torchrun=$!
while true; do
    wait "$torchrun"
    code=$?
    kill -0 "$torchrun" 2>/dev/null || break       # else a signal interrupted the wait
done
if [ -s "$TWOLEVEL_EXIT_FILE" ]; then
    code=$(head -n 1 "$TWOLEVEL_EXIT_FILE")
    [ "$code" = 0 ] || tail -n +2 "$TWOLEVEL_EXIT_FILE" >&2
fi
exit "$code"
