"""benchmarks/gpu_check.sh, which a rare GPU session runs once: here its --dry-run runs every step
on the CPU with tiny sizes and must leave in $OUT exactly what the device tool brings back, with
every step's results in the tarball (slow: run them before spending device time); without
--dry-run, on a machine with no GPU, it refuses at once in one line and writes nothing."""

import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
# What $OUT holds: the device tool returns at most 8 files, named in letters, digits and ._-
OUT_FILES = {"gpu_check_log.txt", "gpu_check.md", "gpu_check_results.tar.gz"}
STEPS = ("tests", "profile", "step_time", "train_run", "memory", "train_table")
TABLES = ("gpu_profile", "gpu_step_time", "gpu_memory", "gpu_train_images_per_s")
# The tiny step-time table (gpu_table.TINY): one line per precision, layout and scheme.
ALL = ("sc", "sc_dp", "sc_split", "gc", "gc2l_fused", "gc2l_pad8", "gc2l_taps")
STEP_LINES = ([("bf16", "channels_last", s) for s in ALL] +
              [("bf16", "NCHW", s) for s in ALL if s not in ("sc_dp", "sc_split")] +
              [(p, layout, s) for p in ["fp32"] for layout in ("channels_last", "NCHW")
               for s in ("sc", "gc", "gc2l_fused")])


def _gpu_check(*args, out: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OUT": str(out),
                                                "PYTHON": sys.executable})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, results = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("run") / "results"
    done = _gpu_check("--dry-run", "--results", str(results), out=out, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(out / "gpu_check_results.tar.gz") as tar:
        files = {member.name.removeprefix("./"): tar.extractfile(member).read()
                 for member in tar.getmembers() if member.isfile()}
    files = {name: data if name.endswith(".png") else data.decode()
             for name, data in files.items()}
    return done, out, files


def _markdown_table(text: str) -> list[list[str]]:
    """The rows (header first) of the last table in a markdown text."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows
            if not line.startswith("|---")]


@pytest.mark.slow          # the dry run: 30-40 s (README, "The GPU check")
def test_the_dry_run_passes_and_leaves_the_three_files_in_out(dry_run):
    done, out, _ = dry_run
    assert done.stdout.strip().splitlines()[-1] == "gpu_check: all passed"
    names = set(os.listdir(out))
    assert names == OUT_FILES and len(names) <= 7
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names)
    log = (out / "gpu_check_log.txt").read_text()
    assert [f"== {step}: ok" in log for step in STEPS] == [True] * len(STEPS)
    summary = (out / "gpu_check.md").read_text()
    assert [f"| {step} | ok |" in summary for step in STEPS] == [True] * len(STEPS)


@pytest.mark.slow          # the dry run: 30-40 s (README, "The GPU check")
def test_the_tarball_holds_every_steps_results(dry_run):
    _, _, files = dry_run
    expected = {f"{table}.{ext}" for table in TABLES for ext in ("csv", "md")}
    expected |= {"tests_junit.xml", "gpu_check.md", "gpu_step_time.png"}
    assert files["gpu_step_time.png"].startswith(b"\x89PNG")
    expected |= {f"logs/{step}.log" for step in STEPS}
    expected |= {f"runs/train_compile/{name}" for name in ("metrics.jsonl", "train.log")}
    assert expected <= set(files), expected - set(files)
    epochs = [json.loads(line) for line in files["runs/train_compile/metrics.jsonl"].splitlines()]
    assert [e["epoch"] for e in epochs] == [1] and epochs[0]["images_per_s"] > 0
    assert 'tests="' in files["tests_junit.xml"]
    for table in TABLES:
        rows = list(csv.DictReader(io.StringIO(files[f"{table}.csv"])))
        assert rows and all(r["status"] == "ok" for r in rows), (table, rows)


@pytest.mark.slow          # the dry run: 30-40 s (README, "The GPU check")
def test_the_step_time_table_has_every_scheme_at_every_n(dry_run):
    _, _, files = dry_run
    header, *rows = _markdown_table(files["gpu_step_time.md"])
    assert header == ["network", "batch", "precision", "layout", "scheme", "N=1", "N=2", "N=4"]
    assert [tuple(r[2:5]) for r in rows] == STEP_LINES
    cell = re.compile(r"[0-9.e+-]+ \([0-9.e+-]+x\)")
    for row in rows:
        measured = row[5:6] if row[4] == "sc" else row[6:]     # SC at N = 1, the rest at N > 1
        assert all(cell.fullmatch(c) for c in measured) and row[0] == "wrn10_1", row
        assert not any(row[5:6] if row[4] != "sc" else row[6:]), row
    # A data-parallel replica holds the whole SC network (and computes batch/N images).
    steps = list(csv.DictReader(io.StringIO(files["gpu_step_time.csv"])))
    sc = {r["params_per_rank"] for r in steps if r["scheme"] == "sc"}
    assert {r["params_per_rank"] for r in steps if r["scheme"] == "sc_dp"} == sc and len(sc) == 1


@pytest.mark.slow          # the dry run: 30-40 s (README, "The GPU check")
def test_the_other_tables_have_their_rows(dry_run):
    _, _, files = dry_run
    memory = list(csv.DictReader(io.StringIO(files["gpu_memory.csv"])))
    assert [(r["precision"], r["conv"], r["N"]) for r in memory] == \
        [(p, "sc" if n == "1" else "gc2l", n) for p in ("bf16", "fp32") for n in ("1", "2", "4")]
    # On the CPU the "measured" peak is memory.py's tracker on real tensors: its plan exactly.
    assert all(abs(float(r["measured_over_planned"]) - 1) < 0.01 for r in memory)
    train = list(csv.DictReader(io.StringIO(files["gpu_train_images_per_s.csv"])))
    assert [(r["mode"], r["scheme"], r["N"]) for r in train] == \
        [(m, s, n) for m in ("eager", "compiled") for s, n in (("sc", "1"), ("gc2l_shard", "2"))]
    assert all(float(r["img_s"]) > 0 for r in train)
    profile = {r["scheme"]: r for r in csv.DictReader(io.StringIO(files["gpu_profile.csv"]))}
    assert list(profile) == ["gc", "gc2l_fused"]
    # GC-2L's coarse level is operators of its own (WRN-10-1, N = 2: 1,961 against 781).
    assert int(profile["gc2l_fused"]["ops_per_step"]) > 2 * int(profile["gc"]["ops_per_step"])
    assert "aten::convolution_backward" in profile["gc"]["top_host_ms"]
    assert all(float(r["host_ms"]) > 0 and float(r["step_ms"]) > 0 for r in profile.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_refuses_at_once_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    results = REPO / "benchmarks" / "results" / "gpu_check"
    before = sorted(results.iterdir()) if results.is_dir() else None
    start = time.monotonic()
    done = _gpu_check(out=out, timeout=60)
    assert time.monotonic() - start < 20
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA device" in done.stderr, done.stderr
    assert list(out.iterdir()) == []
    assert (sorted(results.iterdir()) if results.is_dir() else None) == before
