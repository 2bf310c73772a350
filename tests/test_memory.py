"""benchmarks/memory.py: the fake-tensor measurement of a rank's peak memory agrees with real
allocations and with the closed form; the script's result files are consistent; bad input is
refused before anything is written."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from twolevel_dist.models import count_parameters

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("benchmarks_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


memory = _load_script()
SMALL = memory.resolve_model("wrn10_2")
# Big enough that the CPU kernels' scratch buffers are a small share of the step's memory.
REAL = memory.resolve_model("wrn16_4")


@pytest.mark.parametrize("conv, groups, dtype", [("gc2l", 2, "bf16"), ("gc2l", 4, "fp32")])
def test_fake_peak_matches_real_allocation(conv, groups, dtype):
    ours = memory.measure_step(REAL, conv, groups, dtype, 4, fake=True)
    theirs = memory.measure_step(REAL, conv, groups, dtype, 4, fake=False)
    assert ours["peak"] == pytest.approx(theirs["peak"], rel=memory.FAKE_VS_REAL_REL)
    assert ours["peak_phase"] == theirs["peak_phase"]
    for category in ("params", "grads", "optimizer", "buffers"):
        assert ours["at_end"][category] == theirs["at_end"][category]
    # The CPU allocator holds at least what the tracker counts, and its kernels' scratch on top.
    allocator = memory.allocator_peak(REAL, conv, groups, dtype, 4)
    tracked = theirs["peak"]
    assert tracked <= allocator <= tracked * (1 + memory.ALLOCATOR_EXCESS_MAX)


@pytest.mark.parametrize("name, conv, groups, dtype", [
    ("wrn28_10", "sc", 1, "fp32"), ("wrn28_10", "gc2l", 4, "bf16"), ("wrn28_10", "gc", 8, "fp32"),
    ("wrn28_10", "sc", 2, "bf16"), ("wrn10_2", "gc2l", 16, "bf16")])
def test_measured_categories_match_closed_form(name, conv, groups, dtype):
    spec = memory.resolve_model(name)
    account = memory.measure_step(spec, conv, groups, dtype, 128)
    with memory.fake_tensors():
        params = count_parameters(memory.build_shard(spec, conv, groups))
    closed = memory.closed_form(spec, conv, groups, dtype, 128)
    end = account["at_end"]
    assert closed["params"] == closed["grads"] == closed["optimizer"] == 4 * params
    assert (end["params"], end["grads"], end["optimizer"], end["buffers"]) == \
        (closed["params"], closed["grads"], closed["optimizer"], closed["buffers"])
    saved = account["at_backward_start"]
    assert saved["weight_casts"] == closed["weight_casts"]
    assert saved["activations"] + saved["weight_casts"] == \
        pytest.approx(closed["activations"], rel=memory.CLOSED_FORM_ACTS_REL)
    # Both states of the closed form occur in the step: the peak cannot be below them.
    assert account["peak"] >= closed["peak"]
    at_peak = account["at_peak"]
    assert sum(at_peak.values()) == account["peak"]


def test_memtracker_finds_the_same_peak():
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    theirs = memory.memtracker_peak(SMALL, "gc2l", 2, "bf16", 8)
    ours = memory.measure_step(SMALL, "gc2l", 2, "bf16", 8)
    assert theirs == ours["peak"]


def test_sc_wrn28_60_does_not_fit_one_titan_rtx():
    # The paper could not train SC WRN-28-60 on one 24 GB GPU.
    row = memory.memory_row(memory.resolve_model("wrn28_60"), "sc", 1, "fp32", 128)
    assert row["peak_GB"] > 24 and not row["fits_24GB"]


def _rows(stem: Path) -> list[dict]:
    with open(stem.with_suffix(".csv")) as f:
        return list(csv.DictReader(f))


def test_script_writes_consistent_results(tmp_path):
    stem = tmp_path / "memory"
    args = ["--models", "wrn10_2", "--batch", "4", "--groups", "1", "2", "--convs", "gc2l",
            "gc", "--dtypes", "fp32", "bf16", "--check-model", "wrn10_2", "--check-batch", "2",
            "--check-groups", "1", "--out", str(stem)]
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _rows(stem)
    assert [(r["conv"], r["N"], r["dtype"]) for r in rows] == [
        ("sc", "1", "fp32"), ("sc", "1", "bf16"), ("gc2l", "2", "fp32"), ("gc2l", "2", "bf16"),
        ("gc", "2", "fp32"), ("gc", "2", "bf16")]
    for row in rows:
        value = {k: float(row[k]) for k in row if k.endswith("_GB")}
        whole = value["params_GB"] + value["grads_GB"] + value["optimizer_GB"]
        assert value["peak_GB"] >= whole
        assert value["peak_GB"] == pytest.approx(
            value["params_GB"] + value["optimizer_GB"] + value["buffers_GB"] +
            value["grads_at_peak_GB"] + value["activations_GB"], rel=1e-9)
        assert value["params_GB"] == value["grads_GB"] == value["optimizer_GB"] == \
            pytest.approx(4 * int(row["params_per_rank"]) / 1e9, rel=1e-12)
        for gpu, capacity in memory.GPUS.items():
            expected = value["peak_GB"] * (1 + memory.FRAGMENTATION) + memory.HEADROOM_GB \
                <= capacity
            assert row[f"fits_{gpu}"] == str(expected)
    markdown = stem.with_suffix(".md").read_text()
    assert "python benchmarks/memory.py " + " ".join(args) in markdown
    assert "### Smallest N that fits" in markdown and "memtracker_peak_MB" in markdown


@pytest.mark.parametrize("args, message", [
    (["--models", "resnet50"], "unknown model"),
    (["--models", "wrn10_2", "--groups", "1", "3"], "groups=3"),
])
def test_bad_input_is_refused_before_writing(tmp_path, capsys, args, message):
    stem = tmp_path / "memory"
    assert memory.main([*args, "--out", str(stem)]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not list(tmp_path.iterdir())


def test_bad_model_name_exits_non_zero(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--models", "wrn28_x", "--out",
                          str(tmp_path / "memory")], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.startswith("error: unknown model 'wrn28_x'")
    assert not list(tmp_path.iterdir())
