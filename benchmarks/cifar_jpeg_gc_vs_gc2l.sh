#!/usr/bin/env bash
# GC against GC-2L at the same N on the CIFAR-10 JPEG export (../shared/data), CPU, 2 gloo ranks.
# A first sign of the paper's claim, not its recipe: a small WRN for a few epochs.
#   bash benchmarks/cifar_jpeg_gc_vs_gc2l.sh [epochs] [model]
# Writes benchmarks/results/cifar_jpeg_gc_vs_gc2l.md (and the runs under benchmarks/results/runs/).
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-2}
MODEL=${2:-wrn10_2}
ARCHIVE=${CIFAR_JPEG:-../shared/data/cifar10-jpeg.tar.gz}
OUT=benchmarks/results/cifar_jpeg_gc_vs_gc2l.md
RUNS=benchmarks/results/runs
for conv in gc gc2l; do
    rm -rf "$RUNS/$conv"
    OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 -m twolevel_dist.train \
        model="$MODEL" conv=$conv groups=2 dataset=imagefolder dataset.root="$ARCHIVE" \
        train.epochs="$EPOCHS" "schedule.milestones=[$((EPOCHS - 1))]" tensorboard=false \
        run_dir="$RUNS/$conv"
done
.venv/bin/python - "$RUNS" "$OUT" "$EPOCHS" "$MODEL" <<'PY'
import json, platform, sys
import torch
runs, out, epochs, model = sys.argv[1:]
rows = []
for conv in ("gc", "gc2l"):
    lines = [json.loads(l) for l in open(f"{runs}/{conv}/metrics.jsonl")]
    last = lines[-1]
    rows.append(f"| {conv} | 2 | {last['epoch']} | {last['train_loss']:.3f} | {last['test_loss']:.3f} | "
                f"{last['test_acc']:.2f} | {sum(l['epoch_time_s'] for l in lines):.0f} |")
text = "\n".join([
    f"# GC vs GC-2L on CIFAR-10 (JPEG export), {model}, N = 2, {epochs} epochs",
    "",
    f"Command: `bash benchmarks/cifar_jpeg_gc_vs_gc2l.sh {epochs} {model}` "
    f"(torchrun, 2 gloo ranks on CPU, batch 128, SGD lr 0.1 x0.1 at epoch {int(epochs) - 1}).",
    f"Machine: {platform.machine()}, {torch.get_num_threads()} threads/rank, torch {torch.__version__}, "
    f"Python {platform.python_version()}.",
    "",
    "| conv | N | epochs | train loss | test loss | test acc (%) | train time (s) |",
    "|---|---|---|---|---|---|---|",
    *rows, ""])
open(out, "w").write(text)
print(text)
PY
