#!/usr/bin/env bash
# The one-shot GPU check: at most about 8 minutes on one H100 (the device tool runs one command
# of at most 600 s and returns at most 8 files from $OUT). From the repository root:
#
#   bash benchmarks/gpu_check.sh [--results DIR] [--only STEP,...]   # needs a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run --results DIR             # the same steps on the CPU
#
# --dry-run runs every step on the CPU with tiny sizes and writes the same files, in seconds
# (tests/test_gpu_check.py runs it); what differs is chosen in one place, "Sizes" below.
# Without --dry-run and without a CUDA device it refuses at once (exit 2) and writes nothing.
#
# Steps, most valuable first. Each runs under its own timeout (SIGINT first, so that pytest still
# writes its junit xml and the tables keep their finished rows), keeps its log in logs/, and runs
# even if one before it failed; the exit code says whether all passed. Budgets on the GPU:
#   tests        120 s  tests/test_gpu.py (the `gpu` tests: layers and a sharded network against
#                       float64, two ranks on one GPU), tests/test_devices.py and
#                       tests/test_compile.py, on the image's torch; junit xml
#   profile       45 s  gpu_table.py profile: GC against GC-2L's fused shard of WRN-28-10 at
#                       N = 2, the host's time to issue a step against the step, operators per
#                       step, the operators with the most device and host time (torch.profiler)
#   step_time    100 s  gpu_table.py steps: the per-rank step-time table (it starts no
#                       configuration after 80 s and says what it left out)
#   train_run     80 s  a real `twolevel_dist.train` through torchrun, train.compile=true,
#                       channels-last, bf16: WRN-16-4 GC-2L (groups=2 on one rank: the
#                       single-device GC-2L network), one epoch of 40 steps on synthetic data
#   memory        50 s  gpu_table.py memory: torch.cuda.max_memory_allocated against memory.py's
#                       plan (no new configuration after 35 s)
#   train_table   75 s  gpu_table.py train: images/s of SC and of GC-2L shards, all eager,
#                       then compiled (no new configuration after 50 s; each compilation
#                       takes tens of seconds, so the last N may be left out)
# 470 s of steps and about 15 s of setup (the imports, the wheels): 485 s, less where steps
# finish early. At the very most 545 s: a step not ended 10 s after its SIGINT is killed.
#
# Results go to a fresh folder, default benchmarks/results/gpu_check/<UTC time>, never over
# committed results; --results DIR must be new or empty. Where $OUT is set (the device tool), it
# gets after every step, each file replaced whole:
#   gpu_check_log.txt          the log so far
#   gpu_check.md               the steps' status, the tests' counts, the training run's epoch and
#                              every table so far
#   gpu_check_results.tar.gz   the results folder's csv, md, png, junit xml, step logs and the
#                              training run's metrics.jsonl, train.log and config
#
# Python: ${PYTHON:-python3}, which must import torch. The GPU image has no hydra-core, omegaconf
# or antlr4 (it has PyYAML and packaging, their other needs): where `import hydra, omegaconf`
# fails they are installed from the wheels in .whl/ (gitignored; the device call carries it:
# carry [".whl"]) into /tmp/gpu_check_site, never into the image. Make the wheels here once:
#   python3 -m pip wheel --no-deps -w .whl hydra-core==1.3.2 omegaconf==2.3.0 \
#       antlr4-python3-runtime==4.9.3
# (antlr4 4.9.3 is an sdist: pip wheel builds it into a py3-none-any wheel; all three are pure
# Python, so wheels built on any machine install on the image's Python 3.12).
set -uo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_check: error: $*" >&2; exit 2; }

STEPS=(tests profile step_time train_run memory train_table)
dry_run=0 results="" only=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --results) [ $# -ge 2 ] || die "--results needs a folder"; results=$2; shift ;;
        --only) [ $# -ge 2 ] || die "--only needs step names"; only=$2; shift ;;
        -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (--dry-run, --results DIR, --only STEP,...)" ;;
    esac
    shift
done
for name in ${only//,/ }; do
    [[ " ${STEPS[*]} " == *" $name "* ]] || die "unknown step '$name' in --only (${STEPS[*]})"
done

# One interpreter start for both checks: torch imports, and a CUDA device is there (0).
PY=${PYTHON:-python3}
cuda=$("$PY" -c 'import torch; print(0 if torch.cuda.is_available() else 1)' 2>/dev/null) ||
    die "'$PY' cannot import torch; set PYTHON to the Python that has it"
if [ "$cuda" != 0 ] && [ $dry_run = 0 ]; then
    die "no CUDA device here; this check needs one GPU (--dry-run runs its steps on the CPU)"
fi

need_wheels=0
if ! "$PY" -c 'import hydra, omegaconf' 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 ||
        die "hydra-core/omegaconf do not import and .whl/ holds no wheels (see the top of $0)"
    need_wheels=1
fi

RESULTS=${results:-benchmarks/results/gpu_check/$(date -u +%Y%m%d-%H%M%S)}
if [ -e "$RESULTS" ] && [ -n "$(ls -A "$RESULTS" 2>/dev/null)" ]; then
    die "$RESULTS is not empty: results go to a new folder (--results DIR)"
fi
mkdir -p "$RESULTS/logs" || die "cannot create $RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
LOG=$RESULTS/gpu_check_log.txt
: > "$LOG"
: > "$RESULTS/steps.tsv"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

# ---------------------------------------------------------------------------------------------
# Sizes: the one place where the dry run differs from the GPU run
if [ $dry_run = 1 ]; then
    # test_gpu.py's tests skip without a GPU; test_devices.py and test_compile.py are in the
    # default suite, and here would take longer than the whole dry run may.
    TESTS=(tests/test_gpu.py)
    TABLE_ARGS=(--tiny --device cpu --compile-backend aot_eager)
    TRAIN_ARGS=(model=wrn10_2 model.widen=1 train.batch_size=8 dataset.train_size=32
                dataset.test_size=8 dataset.image_size=8 train.log_every=2)
    # Inductor compiles for minutes on a CPU: torch.compile becomes a no-op in the training run
    # (train.compile=true still takes its path: prepare_for_compile, the wrapped module).
    TRAIN_ENV=(TORCH_COMPILE_DISABLE=1)
    export OMP_NUM_THREADS=1     # the dry run shares two busy cores
else
    TESTS=(tests/test_gpu.py tests/test_devices.py tests/test_compile.py)
    TABLE_ARGS=(--device cuda)
    TRAIN_ARGS=(model=wrn16_4 train.batch_size=128 dataset.train_size=5120
                dataset.test_size=1024 train.log_every=10)
    TRAIN_ENV=()
fi

# ---------------------------------------------------------------------------------------------
# Hydra, where the image lacks it: from .whl/ (checked above), into a folder of our own
if [ $need_wheels = 1 ]; then
    site=/tmp/gpu_check_site pip_log=$RESULTS/logs/pip_install.log
    rm -rf "$site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl \
        > "$pip_log" 2>&1 || die "installing .whl/*.whl failed (log: $pip_log)"
    export PYTHONPATH="$PYTHONPATH:$site"
    "$PY" -c 'import hydra, omegaconf' >> "$pip_log" 2>&1 ||
        die "hydra/omegaconf still do not import after installing .whl/ (log: $pip_log)"
    echo "installed $(cd .whl && echo *.whl) into $site" >> "$LOG"
fi

# ---------------------------------------------------------------------------------------------
# Publishing: the results folder's summary, and $OUT's three files, after every step
summarize() {   # $RESULTS/gpu_check.md: the steps' status, tests, training run, tables so far
    "$PY" - "$RESULTS" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
results = Path(sys.argv[1])
lines = ["# GPU check", ""] + [f"    {l}" for l in (results / "environment.txt").read_text()
                                .splitlines()] + ["", "| step | status | seconds | budget |",
                                                  "|---|---|---|---|"]
lines += ["| " + " | ".join(row.split("\t")) + " |"
          for row in (results / "steps.tsv").read_text().splitlines()]
junit = results / "tests_junit.xml"
if junit.is_file():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    lines += ["", "## Tests", "", ", ".join(f"{v} {k}" for k, v in counts.items()) +
              f" in {float(suite.get('time', 0)):.0f} s" +
              "".join(f"\n- FAILED {name}" for name in failed)]
metrics = results / "runs" / "train_compile" / "metrics.jsonl"
if metrics.is_file():
    keys = ("epoch", "step", "train_loss", "test_acc", "images_per_s", "epoch_time_s")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    lines += ["", "## Training run (torchrun, train.compile=true)", "",
              "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else
                                str(r.get(k, "")) for k in keys) + " |" for r in records]
for name in ("gpu_profile", "gpu_step_time", "gpu_memory", "gpu_train_images_per_s"):
    table = results / f"{name}.md"
    if table.is_file():       # each table's title one level down
        lines += ["", "#" + table.read_text()]
(results / "gpu_check.md.tmp").write_text("\n".join(lines) + "\n")
(results / "gpu_check.md.tmp").replace(results / "gpu_check.md")
EOF
}

publish() {
    summarize 2>&1 | tee -a "$LOG"
    [ -n "${OUT:-}" ] || return 0
    local files
    files=$(cd "$RESULTS" && find . -maxdepth 1 -type f \( -name '*.csv' -o -name '*.md' \
        -o -name '*.png' -o -name '*.xml' -o -name '*.txt' -o -name '*.tsv' \) ;
        find logs -type f -name '*.log'; find runs -type f \( -name metrics.jsonl \
        -o -name train.log -o -name config.yaml \) 2>/dev/null)
    # shellcheck disable=SC2086   # one name per line, none with spaces
    tar -czf "$OUT/gpu_check_results.tar.gz.tmp" -C "$RESULTS" $files &&
        mv "$OUT/gpu_check_results.tar.gz.tmp" "$OUT/gpu_check_results.tar.gz"
    cp "$RESULTS/gpu_check.md" "$OUT/gpu_check.md.tmp" &&
        mv "$OUT/gpu_check.md.tmp" "$OUT/gpu_check.md"
    cp "$LOG" "$OUT/gpu_check_log.txt.tmp" &&
        mv "$OUT/gpu_check_log.txt.tmp" "$OUT/gpu_check_log.txt"
}

# ---------------------------------------------------------------------------------------------
# Steps
failed=()
step() {   # step NAME BUDGET_S COMMAND...: run it under its budget, log it, publish, go on
    local name=$1 budget=$2 start=$SECONDS rc status
    shift 2
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then return 0; fi
    echo "== $name (budget $budget s): $*" | tee -a "$LOG"
    timeout -s INT -k 10 "$budget" "$@" 2>&1 | tee "$RESULTS/logs/$name.log" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124|137) status="TIMED OUT" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    [ "$status" = ok ] || failed+=("$name")
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$budget" \
        >> "$RESULTS/steps.tsv"
    echo "== $name: $status in $((SECONDS - start)) s" | tee -a "$LOG"
    publish
}

{
    echo "gpu_check $(date -u +%FT%TZ), $([ $dry_run = 1 ] && echo 'DRY RUN (CPU, tiny sizes)' ||
        echo GPU), results $RESULTS"
    command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch",
torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else "(no GPU)")'
} 2>&1 | tee "$RESULTS/environment.txt" | tee -a "$LOG"

step tests 120 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
    --junitxml="$RESULTS/tests_junit.xml"
step profile 45 "$PY" benchmarks/gpu_table.py profile --out "$RESULTS" "${TABLE_ARGS[@]}"
step step_time 100 "$PY" benchmarks/gpu_table.py steps --out "$RESULTS" --time-limit 80 \
    "${TABLE_ARGS[@]}"
step train_run 80 env "${TRAIN_ENV[@]}" "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node=1 -m twolevel_dist.train conv=gc2l groups=2 train.epochs=1 \
    "schedule.milestones=[]" train.channels_last=true train.compile=true tensorboard=false \
    run_dir="$RESULTS/runs/train_compile" "${TRAIN_ARGS[@]}"
step memory 50 "$PY" benchmarks/gpu_table.py memory --out "$RESULTS" --time-limit 35 \
    "${TABLE_ARGS[@]}"
step train_table 75 "$PY" benchmarks/gpu_table.py train --out "$RESULTS" --time-limit 50 \
    "${TABLE_ARGS[@]}"

echo "results: $RESULTS" | tee -a "$LOG"
if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: all passed" | tee -a "$LOG"
else
    echo "gpu_check: ${#failed[@]} step(s) FAILED: ${failed[*]}" | tee -a "$LOG"
fi
[ -z "${OUT:-}" ] || { cp "$LOG" "$OUT/gpu_check_log.txt.tmp" &&
    mv "$OUT/gpu_check_log.txt.tmp" "$OUT/gpu_check_log.txt"; }
[ ${#failed[@]} -eq 0 ]
