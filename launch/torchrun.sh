#!/usr/bin/env bash
# Single node: one rank per GPU (NCCL), or NPROC CPU ranks on gloo when there is no GPU.
#   bash launch/torchrun.sh model=wrn28_10 dataset=cifar10 conv=gc2l groups=4
# Environment: NPROC (ranks; default: the GPU count, else 2), MAX_RESTARTS (default 1: a failed
# rank restarts the job, which resumes from the latest complete checkpoint), PYTHON.
#
# Exits with the job's own code (twolevel_dist/engine/ending.py), which torchrun itself hides:
# 0 done, 2 refused (never restarted: a restart cannot fix a config error), 3 a rank died or
# hung, 75 stopped by Ctrl-C / SIGTERM / SIGUSR2 with a complete checkpoint (continue with the
# same command and resume=auto run_dir=<the directory the last line names>), 130 stopped before
# the first training step (nothing to save). The job's one
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
trap 'rm -f "$TWOLEVEL_EXIT_FILE" "$TWOLEVEL_EXIT_FILE.stop"' EXIT
# Stop signals go from this script to the ranks themselves. torchrun starts each rank in a
# session of its own, so a Ctrl-C at the terminal reaches only this script and torchrun; and
# torchrun, signalled, passes the signal on but kills its ranks 30 s later (torch 2.11's fixed
# grace), whatever they are writing. So torchrun runs in a process group of its own (set -m),
# out of the terminal's reach, and this script signals its ranks: Ctrl-C (SIGINT) as SIGINT;
# SIGTERM, SIGUSR2 and SIGHUP (a scheduler's stop, a time limit's warning, a closed terminal)
# as SIGTERM. Each rank finishes its step and writes its checkpoint (or, before training
# began, ends at once), however long that takes. torchrun restarts the stopped ranks (and any
# the signal killed while they were still importing), which find the stop recorded and end at
# once (twolevel_dist/engine/ending.py). A second request
# ends torchrun too (it then ends the ranks), and the same signal again ends each rank at once.
stop_ranks() {
    local ranks
    : >"$TWOLEVEL_EXIT_FILE.stop"       # ranks torchrun starts from now on end at once
    ranks=$(cat /proc/"$torchrun"/task/*/children 2>/dev/null)
    if [ -n "$ranks" ] && [ "$stops" = 0 ]; then
        kill -"$1" $ranks 2>/dev/null
    else            # no ranks (torchrun is starting or restarting them), or asked again
        kill -TERM "$torchrun" 2>/dev/null
        [ -n "$ranks" ] && kill -"$1" $ranks 2>/dev/null
    fi
    stops=$((stops + 1))
}
stops=0
trap 'stop_ranks INT' INT
trap 'stop_ranks TERM' TERM USR2 HUP
set -m
"$PYTHON" -m twolevel_dist.torchrun --standalone --nproc_per_node="$NPROC" \
    --max-restarts="${MAX_RESTARTS:-1}" -m twolevel_dist.train "$@" &
torchrun=$!
set +m
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
