#!/usr/bin/env bash
# SG-CNN and the self-grouped conversion on the CIFAR-10 JPEG export (../shared/data), on CPU.
#   bash benchmarks/selfgroup_cifar.sh [--update] [baseline_epochs] [model] [groups]
# 1. trains the SC baseline (skipped when its model.pt exists: delete the run folder to redo it);
# 2. SG-CNN: progressive self-grouping pruning to two compression levels, fine-tuned;
# 3. converts the baseline into GC-2L with N groups, self-grouped and contiguous partitions,
#    each fine-tuned for the same number of epochs.
# Environment: CIFAR_JPEG (the archive), FT_STEPS (steps per fine-tuning epoch, default 200 of
# the 390 in an epoch: a CPU budget), SG_ARGS / CONVERT_ARGS (extra overrides).
# Writes selfgroup_<model>.md and its per-layer tables (benchmarks/selfgroup_table.py) to a fresh
# folder, benchmarks/results/new/<UTC time>/; --update replaces the committed ones in
# benchmarks/results/ instead. Runs: benchmarks/results/runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="bash benchmarks/selfgroup_cifar.sh $*"
UPDATE=()
if [ "${1:-}" = --update ]; then UPDATE=(--update); shift; fi
EPOCHS=${1:-6}
MODEL=${2:-wrn10_2}
NGROUPS=${3:-4}
usage="usage: bash benchmarks/selfgroup_cifar.sh [--update] [baseline_epochs] [model] [groups]"
if [[ "$EPOCHS" == -* || "$MODEL" == -* || "$NGROUPS" == -* || $# -gt 3 ]]; then
    echo "error: unknown option or too many arguments: $*; $usage" >&2; exit 2
fi
if ! [[ "$EPOCHS" =~ ^[1-9][0-9]*$ && "$NGROUPS" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: baseline_epochs ($EPOCHS) and groups ($NGROUPS) must be positive integers; $usage" >&2
    exit 2
fi
ARCHIVE=${CIFAR_JPEG:-../shared/data/cifar10-jpeg.tar.gz}
RUNS=benchmarks/results/runs
BASE=$RUNS/selfgroup_${MODEL}_sc
DATA=(dataset=imagefolder dataset.root="$ARCHIVE")
if [ ! -f "$BASE/model.pt" ]; then
    rm -rf "$BASE"
    .venv/bin/python -m twolevel_dist.train model="$MODEL" conv=sc groups=1 "${DATA[@]}" \
        train.epochs="$EPOCHS" schedule=cosine tensorboard=false run_dir="$BASE"
fi
COMMON=(model="$MODEL" "${DATA[@]}" checkpoint="$BASE/model.pt" finetune.max_steps=${FT_STEPS:-200})
# SG-CNN: groups of filters per layer, progressive steps of 25% to 50% and 75% pruned.
rm -rf "$RUNS/selfgroup_${MODEL}_sg"
.venv/bin/python -m twolevel_dist.compress "${COMMON[@]}" method=sg sg.groups=4 \
    'sg.targets=[0.5,0.75]' sg.step=0.25 sg.local_epochs=1 sg.global_epochs=2 \
    run_dir="$RUNS/selfgroup_${MODEL}_sg" ${SG_ARGS:-}
# SC -> GC-2L with N groups: self-grouped against contiguous channel partitions.
rm -rf "$RUNS/selfgroup_${MODEL}_convert"
.venv/bin/python -m twolevel_dist.compress "${COMMON[@]}" method=convert convert.conv=gc2l \
    convert.groups="$NGROUPS" 'convert.partitions=[selfgroup,contiguous]' convert.epochs=2 \
    run_dir="$RUNS/selfgroup_${MODEL}_convert" ${CONVERT_ARGS:-}
.venv/bin/python benchmarks/selfgroup_table.py "$RUNS/selfgroup_${MODEL}" "$COMMAND" \
    "${UPDATE[@]}"
