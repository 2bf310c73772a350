#!/usr/bin/env bash
# The one-shot GPU check: about 8 minutes on one H100/H200. Run from anywhere:
#
#   bash benchmarks/gpu_check.sh            # results under benchmarks/results/*_gpu*
#
# 1. the `gpu`-marked tests (layers against F.conv2d in fp32 and bf16, a shard built and trained
#    on the GPU, two ranks on ONE GPU through a CUDA-only gloo backend) and the CPU stand-ins of
#    tests/test_devices.py;
# 2. a 1-rank NCCL training run through torchrun (bf16 by default on CUDA, channels_last),
#    eager and compiled;
# 3. benchmarks/layers.py and scaling.py sim on the GPU: WRN-28-10 and WRN-28-40 at
#    N = 1, 2, 4, 8, 16, GC-2L fused and with overlap (the taps path), bf16, channels_last.
# Every step runs even if one before it failed; the exit code says whether all passed. Where
# $OUT is set (the device tool), the logs and result files are copied there too.
#
# Python packages the GPU image may lack (hydra-core, omegaconf, antlr4) are installed from
# wheels in .whl/ if present (see README, "The GPU check"); the project runs from the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
LOG=$RESULTS/gpu_check_log.txt
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null && ls .whl/* >/dev/null 2>&1; then
    # antlr4's 4.9.3 (what omegaconf 2.3 pins) comes as a pure-Python sdist: no build isolation.
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-build-isolation \
        --target /tmp/gpu_check_site .whl/*
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
status=0
step() {   # step NAME COMMAND...: run it, log it, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*" | tee -a "$LOG"
    local start=$SECONDS
    if "$@" 2>&1 | tee -a "$LOG"; then
        echo "== $name: ok in $((SECONDS - start)) s" | tee -a "$LOG"
    else
        echo "== $name: FAILED after $((SECONDS - start)) s" | tee -a "$LOG"; status=1
    fi
}
: > "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

step tests "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_devices.py \
    --junitxml="$RESULTS/gpu_check_tests.xml"

train_dir=$(mktemp -d)
for compile in false true; do
    step "train_compile_$compile" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
        -m twolevel_dist.train model=wrn16_4 groups=2 train.epochs=1 "schedule.milestones=[]" \
        train.max_steps=100 \
        dataset.train_size=12800 train.channels_last=true train.compile=$compile \
        run_dir="$train_dir/compile_$compile" tensorboard=false
done

step layers "$PY" benchmarks/layers.py --channels 640 --size 8 --batch 128 --groups 2 4 8 16 \
    --reps 20 --warmup 5 --out "$RESULTS/layers_c640_s8_gpu"
step scaling_wrn28_10 "$PY" benchmarks/scaling.py sim --model wrn28_10 --batch 128 \
    --groups 1 2 4 8 16 --convs sc gc gc2l --with-overlap --amp --channels-last --reps 10 --warmup 3
step scaling_wrn28_40 "$PY" benchmarks/scaling.py sim --model wrn28_40 --batch 32 \
    --groups 1 2 4 8 16 --convs sc gc gc2l --with-overlap --amp --channels-last --reps 5 --warmup 2

if [ -n "${OUT:-}" ]; then
    cp "$LOG" "$RESULTS"/gpu_check_tests.xml "$RESULTS"/*_gpu*.csv "$RESULTS"/*_gpu*.md "$OUT"/ \
        2>/dev/null
fi
echo "gpu_check: $([ $status -eq 0 ] && echo all passed || echo SOME FAILED) (log: $LOG)"
exit $status
