"""The benchmarks end to end on tiny shapes: their result files are written, read back and
internally consistent (speedups from the step times, communication from the closed form, every
transport measured). Speed itself is never asserted."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from twolevel_dist.models import build_model
from twolevel_dist.parallel.comm_model import expected_comm

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]


def _scaling(*args):
    _run("scaling.py", *args)


def _rows(stem: Path) -> list[dict]:
    with open(stem.with_suffix(".csv")) as f:
        return list(csv.DictReader(f))


def _closed_form_megabytes(ranks: int, batch: int) -> float:
    model = build_model("wrn", conv="gc2l", groups=ranks, depth=10, widen=2, num_classes=10)
    _, nbytes = expected_comm(model, ranks, batch=batch, image_size=32, num_classes=10)
    return sum(nbytes.values()) / 1e6


@pytest.mark.slow          # 35 s of torchrun jobs: run with -m slow (README, "Tests")
def test_real_scaling_writes_consistent_results(tmp_path):
    # Real ranks under torchrun; their collectives are stand-ins here (the engine's real ones are
    # tested in test_parallel.py), which keeps this test to a few seconds per job.
    collectives = "local"
    stem = tmp_path / "real"
    _scaling("real", "--model", "wrn10_2", "--batch", "4", "--groups", "1", "2", "--convs", "sc",
             "gc2l", "--collectives", collectives, "--bind-cores",
             "--rounds", "2", "--reps", "2", "--warmup", "1", "--out", str(stem))
    rows = _rows(stem)
    assert [(r["conv"], r["N"]) for r in rows] == [("sc", "1"), ("sc", "2"), ("gc2l", "2")]
    baseline = float(rows[0]["step_s"])
    for row in rows:
        assert row["collectives"] == collectives and row["layout"] == "NCHW"
        speedup = float(row["speedup_vs_sc1"])
        assert speedup == pytest.approx(baseline / float(row["step_s"]), rel=1e-6)
        assert float(row["efficiency"]) == pytest.approx(speedup / float(row["ideal"]), rel=1e-6)
        assert 0 < float(row["step_min_s"]) <= float(row["step_s"])
    # The bytes are counted whether the collectives are real or stand-ins.
    assert float(rows[2]["comm_MB"]) == pytest.approx(_closed_form_megabytes(2, 4), rel=1e-6)
    markdown = stem.with_suffix(".md").read_text()
    assert f"--collectives {collectives}" in markdown and "2 interleaved rounds" in markdown


def test_per_rank_simulation_writes_consistent_results(tmp_path):
    stem = tmp_path / "sim"
    _scaling("sim", "--model", "wrn10_2", "--batch", "4", "--groups", "1", "2", "--convs", "sc",
             "gc", "gc2l", "--with-overlap", "--amp", "--reps", "1", "--warmup", "1",
             "--channels-last", "--out", str(stem))
    rows = {(r["conv"], r["N"]): r for r in _rows(stem)}
    assert set(rows) == {("sc", "1"), ("sc", "2"), ("gc", "2"), ("gc2l", "2"),
                         ("gc2l+overlap", "2")}
    assert {(r["layout"], r["precision"], r["device"]) for r in rows.values()} == {
        ("channels_last", "bf16", "cpu")}
    gc2l = rows[("gc2l", "2")]
    # Under bf16 autocast the representatives and logits travel in bf16: half the closed form's
    # float32 bytes. The overlap path moves the same.
    assert float(gc2l["comm_MB"]) == pytest.approx(_closed_form_megabytes(2, 4) / 2, rel=1e-6)
    assert float(rows[("gc2l+overlap", "2")]["comm_MB"]) == pytest.approx(
        float(gc2l["comm_MB"]), rel=1e-6)
    assert float(gc2l["total_s"]) == pytest.approx(
        float(gc2l["compute_s"]) + float(gc2l["comm_model_s"]), rel=1e-6)
    assert float(rows[("gc", "2")]["params_per_rank"]) < float(gc2l["params_per_rank"])


def test_transport_benchmark_measures_both_transports_of_both_exchanges(tmp_path):
    stem = tmp_path / "transport"
    _run("transport.py", "--ranks", "2", "--kb", "1", "4", "--rounds", "1", "--reps", "2",
         "--warmup", "1", "--overlap-ms", "0.2", "--out", str(stem))
    rows = _rows(stem)
    assert sorted((r["op"], r["transport"], r["KB_per_rank"]) for r in rows) == sorted(
        (op, transport, kb) for op in ("all_gather", "reduce_scatter")
        for transport in ("native", "direct") for kb in ("1", "4"))
    for row in rows:
        assert row["N"] == "2" and float(row["wall_ms"]) > 0
        assert float(row["overlapped_wall_ms"]) > 0 and float(row["backend_threads_cpu_ms"]) >= 0
    assert "transport.py --ranks 2" in stem.with_suffix(".md").read_text()


@pytest.mark.slow          # two torchrun jobs: run with -m slow (README, "Tests")
def test_streaming_benchmark_times_both_decode_modes(tmp_path):
    from PIL import Image
    for c in ("a", "b"):
        folder = tmp_path / "images" / "train" / c
        folder.mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(folder / f"{i}.jpg")
    stem = tmp_path / "streaming"
    _run("streaming.py", "--root", str(tmp_path / "images"), "--batch", "4", "--batches", "2",
         "--reps", "1", "--image-size", "16", "--workers", "0", "--out", str(stem))
    rows = _rows(stem)
    assert [r["mode"].split()[0] for r in rows] == ["every", "each"]
    assert float(rows[1]["speedup"]) == pytest.approx(
        float(rows[0]["batch_s"]) / float(rows[1]["batch_s"]), rel=0.02)
