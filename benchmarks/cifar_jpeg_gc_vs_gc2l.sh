#!/usr/bin/env bash
# GC against GC-2L at the same N on the CIFAR-10 JPEG export (../shared/data), on CPU.
# A first sign of the paper's claim, not its recipe: a small WRN for a few epochs.
#   bash benchmarks/cifar_jpeg_gc_vs_gc2l.sh [epochs] [model] [groups] [ranks]
# ranks = 1 trains the single-device model (the same network the ranks compute together);
# ranks > 1 runs torchrun with that many gloo ranks (ranks must be a multiple of groups).
# Environment: CONVS (default "gc gc2l"), CIFAR_JPEG (the archive).
# Writes benchmarks/results/cifar_jpeg_gc_vs_gc2l_<model>_N<groups>.md (runs: benchmarks/results/runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-3}
MODEL=${2:-wrn10_4}
NGROUPS=${3:-8}
RANKS=${4:-1}
ARCHIVE=${CIFAR_JPEG:-../shared/data/cifar10-jpeg.tar.gz}
OUT=benchmarks/results/cifar_jpeg_gc_vs_gc2l_${MODEL}_N${NGROUPS}.md
RUNS=benchmarks/results/runs
if [ "$RANKS" -gt 1 ]; then
    LAUNCH=(.venv/bin/torchrun --standalone --nproc_per_node="$RANKS" -m twolevel_dist.train)
    export OMP_NUM_THREADS=1
else
    LAUNCH=(.venv/bin/python -m twolevel_dist.train)
fi
for conv in ${CONVS:-gc gc2l}; do       # CONVS=gc2l reruns one kind, keeping the other's run
    rm -rf "$RUNS/${MODEL}_N${NGROUPS}_$conv"
    "${LAUNCH[@]}" model="$MODEL" conv=$conv groups="$NGROUPS" dataset=imagefolder \
        dataset.root="$ARCHIVE" train.epochs="$EPOCHS" "schedule.milestones=[$((EPOCHS - 1))]" \
        tensorboard=false run_dir="$RUNS/${MODEL}_N${NGROUPS}_$conv"
done
.venv/bin/python - "$RUNS" "$OUT" "$EPOCHS" "$MODEL" "$NGROUPS" "$RANKS" <<'PY'
import json, os, platform, sys
import torch
runs, out, epochs, model, groups, ranks = sys.argv[1:]
rows = []
for conv in ("gc", "gc2l"):
    lines = [json.loads(l) for l in open(f"{runs}/{model}_N{groups}_{conv}/metrics.jsonl")]
    accs = " / ".join(f"{l['test_acc']:.2f}" for l in lines)
    last = lines[-1]
    rows.append(f"| {conv} | {groups} | {last['train_loss']:.3f} | {last['test_loss']:.3f} | "
                f"{accs} | {sum(l['epoch_time_s'] for l in lines):.0f} |")
launch = f"torchrun, {ranks} gloo ranks, 1 thread each" if int(ranks) > 1 else \
    f"one process (the single-device model), {torch.get_num_threads()} threads"
text = "\n".join([
    f"# GC vs GC-2L on CIFAR-10 (JPEG export): {model}, N = {groups}, {epochs} epochs",
    "",
    f"Command: `bash benchmarks/cifar_jpeg_gc_vs_gc2l.sh {epochs} {model} {groups} {ranks}`",
    f"({launch}; batch 128, SGD momentum 0.9, lr 0.1, x0.1 for the last epoch, weight decay 5e-4).",
    f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
    f"Python {platform.python_version()}. Train times are wall-clock on a shared 2-core machine.",
    "",
    "| conv | N | final train loss | final test loss | test acc per epoch (%) | train time (s) |",
    "|---|---|---|---|---|---|",
    *rows, ""])
open(out, "w").write(text)
print(text)
PY
