"""DDP's gradient all-reduce in the communication model (twolevel_dist/parallel/comm_model.py),
checked against hand-computed numbers and against the buckets real DDP reduces on gloo ranks;
and benchmarks/dp_vs_gp.py's projection on the committed GPU step times."""

import csv
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from distributed import run_on_ranks
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from twolevel_dist.models import build_model
from twolevel_dist.parallel import count_collectives, init_mesh, parallelize
from twolevel_dist.parallel.comm_model import (
    DDP_BUCKET_BYTES,
    DDP_FIRST_BUCKET_BYTES,
    LINKS,
    LinkModel,
    ddp_bucket_bytes,
    ddp_seconds,
    expected_comm,
    gradient_ready_order,
    sent_bytes,
)
from twolevel_dist.parallel.simulated import simulated_mesh

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import common  # noqa: E402
import dp_vs_gp  # noqa: E402
import plotting  # noqa: E402
import replot  # noqa: E402

WRN10_2 = dict(depth=10, widen=2, num_classes=10)


# ---------------------------------------------------------------------------------------------
# The formulas, by hand
def test_ddp_seconds_by_hand():
    link = LinkModel("test", bandwidth_gbs=1.0, latency_us=10.0)
    # Ring all-reduce over 4 ranks: 6 steps of 10 us, each rank sends 2 x 3/4 of the bucket.
    t = [6e-5 + 1.5 * b / 1e9 for b in (100e6, 50e6, 10e6)]      # 0.15006, 0.07506, 0.01506
    no_overlap, ideal = ddp_seconds([100e6, 50e6, 10e6], 4, link, backward_s=0.1)
    assert no_overlap == pytest.approx(0.24018)
    assert ideal == pytest.approx(t[2] + (t[0] + t[1] - 0.1))    # 0.14018: 0.1 s hidden
    assert ddp_seconds([100e6, 50e6, 10e6], 4, link, backward_s=1.0)[1] == pytest.approx(t[2])
    assert ddp_seconds([100e6], 1, link, backward_s=0.0) == (0.0, 0.0)    # one replica
    assert ddp_seconds([], 4, link, backward_s=0.0) == (0.0, 0.0)         # no data parallelism


def test_sent_bytes_and_the_ethernet_preset_by_hand():
    assert sent_bytes({"all_reduce": 4e9}, 4) == pytest.approx(6e9)      # 2 x 3/4
    assert sent_bytes({"all_gather": 4e9, "reduce_scatter": 2e9}, 4) == pytest.approx(4.5e9)
    assert sent_bytes({"all_reduce": 4e9}, 1) == 0.0
    assert LINKS["ethernet100"] == LinkModel("ethernet100", 12.5, 10.0)   # 100 Gb/s
    assert DDP_FIRST_BUCKET_BYTES == torch.distributed._DEFAULT_FIRST_BUCKET_BYTES == 1 << 20
    assert DDP_BUCKET_BYTES == 25 << 20


def test_buckets_follow_the_backward_and_close_at_their_cap():
    # Gradients of 48 B (conv 3->4, 1x1), 128 B (conv 4->8) and 64 B (linear 8->2), made in the
    # reverse order: linear, conv2, conv1.
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(4, 8, 1, bias=False),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2, bias=False))
    assert gradient_ready_order(model) == [2, 1, 0]
    assert ddp_bucket_bytes(model, first_bucket_bytes=64, bucket_bytes=100) == [64, 128, 48]
    assert ddp_bucket_bytes(model, first_bucket_bytes=100, bucket_bytes=100) == [192, 48]
    assert ddp_bucket_bytes(model) == [240]                        # under DDP's 1 MiB
    assert all(p.grad is None for p in model.parameters()) and model.training


def test_gradient_bytes_of_the_papers_networks():
    # 4 bytes (fp32) per parameter: WRN-28-10 36,479,194 and WRN-28-40 583,060,954 parameters
    # (benchmarks/results/params.md, configs/model/wrn28_40.yaml).
    with torch.device("meta"):
        for widen, params in ((10, 36_479_194), (40, 583_060_954)):
            model = build_model("wrn", conv="sc", depth=28, widen=widen, num_classes=10)
            buckets = ddp_bucket_bytes(model)
            assert sum(buckets) == 4 * params
            # Each bucket closed at its cap, overshooting by less than one gradient (WRN-28-40's
            # largest, 2560 x 2560 x 3 x 3, is a bucket of 236 MB on its own).
            largest = max(4 * p.numel() for p in model.parameters())
            assert DDP_FIRST_BUCKET_BYTES <= buckets[0] < DDP_FIRST_BUCKET_BYTES + largest
            assert all(DDP_BUCKET_BYTES <= b < DDP_BUCKET_BYTES + largest for b in buckets[1:-1])
    # the ring over 8 replicas sends 2 x 7/8 of WRN-28-10's gradients per rank
    assert sent_bytes({"all_reduce": 4 * 36_479_194}, 8) == pytest.approx(255_354_358, abs=1)


def test_gc2l_collectives_travel_in_bf16_under_autocast():
    shard = parallelize(build_model("wrn", conv="gc2l", groups=4, **WRN10_2), simulated_mesh(4),
                        overlap=False)
    with count_collectives() as stats:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(shard(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        loss.backward()
    calls, nbytes = expected_comm(build_model("wrn", conv="gc2l", groups=4, **WRN10_2), 4,
                                  batch=4, image_size=32, num_classes=10, element_size=2)
    assert dict(stats.calls) == calls and dict(stats.bytes) == nbytes
    assert nbytes["all_gather"] == 3 * 4 * 4 * (32 * 32 + 16 * 16 + 8 * 8) * 2   # 3 per stage


# ---------------------------------------------------------------------------------------------
# Against DDP itself: the buckets its comm hook sees on gloo ranks
def _ddp_buckets(gp: int, caps_mb) -> list:
    """Per DDP bucket cap (None: the engine's parallelize, DDP's defaults; else plain DDP with
    that ``bucket_cap_mb``), three bf16-autocast steps of WRN-10-2: each step's (bytes, dtype)
    per bucket, and what the engine's counters saw."""
    results = []
    for cap_mb in caps_mb:
        torch.manual_seed(0)                  # the same model and batch on every rank
        model = build_model("wrn", conv="gc2l" if gp > 1 else "sc", groups=gp, **WRN10_2)
        ddp = parallelize(model, init_mesh(groups=gp)) if cap_mb is None else \
            DistributedDataParallel(model, bucket_cap_mb=cap_mb)
        buckets, counted = [], []

        def record(group, bucket):
            buffer = bucket.buffer()
            buckets[-1].append((buffer.numel() * buffer.element_size(), str(buffer.dtype)))
            return default_hooks.allreduce_hook(group, bucket)
        ddp.register_comm_hook(ddp.process_group, record)
        for _ in range(3):
            buckets.append([])
            with count_collectives() as stats:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(ddp(torch.randn(4, 3, 32, 32)),
                                           torch.randint(0, 10, (4,)))
                loss.backward()
            counted.append(dict(stats.calls))
        results.append((buckets, counted))
    return results


@pytest.mark.parametrize("gp,caps_mb", [(1, (None, 0.25)), (2, (None,))], ids=["dp2", "dp2xgp2"])
def test_modelled_buckets_are_the_ones_ddp_reduces(gp, caps_mb):
    model = build_model("wrn", conv="gc2l" if gp > 1 else "sc", groups=gp, **WRN10_2)
    shard = parallelize(model, simulated_mesh(gp)) if gp > 1 else model
    params = sum(p.numel() for p in shard.parameters())
    results = run_on_ranks(2 * gp, _ddp_buckets, gp, caps_mb)
    for cap_mb, *rank_results in zip(caps_mb, *results):
        caps = {} if cap_mb is None else dict(first_bucket_bytes=int(cap_mb * 2 ** 20),
                                              bucket_bytes=int(cap_mb * 2 ** 20))
        expected = ddp_bucket_bytes(shard, **caps)
        assert len(expected) == (4 if cap_mb else 2 if gp == 1 else 1)
        for rank_buckets, counted in rank_results:
            first, *later = [[size for size, _ in step] for step in rank_buckets]
            assert first == [4 * params]             # the first step: one bucket of everything
            assert later == [expected, expected]     # then DDP's rebuilt buckets, as modelled
            assert {dtype for step in rank_buckets for _, dtype in step} == {"torch.float32"}
            # The engine's counters see the gp collectives only, never DDP's all-reduce.
            gp_calls = {"all_gather": 9, "reduce_scatter": 9, "all_reduce": 1} if gp > 1 else {}
            assert counted == [gp_calls] * 3


# ---------------------------------------------------------------------------------------------
# The projection on the committed GPU step times
def _rows(networks, gpus, links):
    steps = dp_vs_gp.read_steps(dp_vs_gp.STEPS_CSV)
    return dp_vs_gp.projection(networks, gpus, links, steps, 128, with_memory=False)


def _row(rows, network, link, n, scheme):
    matches = [r for r in rows if r["network"] == network and r["N"] == n
               and r["scheme"] == scheme and r["link"] in (link, "none")]
    assert len(matches) == 1, (network, link, n, scheme)
    return matches[0]


def test_projection_by_hand_on_the_committed_step_times():
    rows = _rows(["wrn28_40"], [2, 16], ["ethernet100"])
    sc = _row(rows, "wrn28_40", "none", 1, "SC, one GPU")
    assert sc["step_no_overlap_ms"] == pytest.approx(125.937491) and sc["speedup_no_overlap"] == 1
    # DDP, 2 replicas: 65.43 ms of compute, then 4P = 2,332,243,816 B all-reduced over
    # 12.5 GB/s (a ring of 2 sends all of it once): 186.58 ms, and 2 x 10 us per bucket.
    ddp = _row(rows, "wrn28_40", "ethernet100", 2, "DDP")
    with torch.device("meta"):
        buckets = len(ddp_bucket_bytes(build_model("wrn", conv="sc", depth=28, widen=40)))
    assert ddp["step_no_overlap_ms"] == pytest.approx(65.432533 + 186.579505 + 0.02 * buckets)
    assert ddp["gradient_allreduce_MB"] == pytest.approx(2332.243816)
    # Ideal overlap hides up to the backward (2/3 of the step) of all buckets but the last.
    hidden = ddp["step_no_overlap_ms"] - ddp["step_ideal_overlap_ms"]
    assert hidden == pytest.approx(2 / 3 * 65.432533)
    assert ddp["speedup_no_overlap"] == pytest.approx(125.937491 / ddp["step_no_overlap_ms"])
    # GC-2L, N = 2: 60.37 ms, then 27 all-gathers and 27 reduce-scatters of the bf16
    # representatives (each a ring of 1 step: 10 us, and half of the tensor sent) and the
    # logits' all-reduce (2 steps).
    gc2l = _row(rows, "wrn28_40", "ethernet100", 2, "GC-2L")
    per_kind = 9 * 128 * 2 * (32 * 32 + 16 * 16 + 8 * 8) * 2         # 6,193,152 B
    comm_ms = 54 * 0.01 + 0.02 + (per_kind + 128 * 10 * 2) / 12.5e9 * 1e3
    assert gc2l["gp_comm_ms"] == pytest.approx(comm_ms)
    assert gc2l["step_no_overlap_ms"] == gc2l["step_ideal_overlap_ms"] == pytest.approx(
        60.372288 + comm_ms)
    assert gc2l["params_per_rank"] == 145_980_802
    # N = 16: GC-2L was not measured on WRN-28-40; a mix's compute is a bound, said so.
    assert _row(rows, "wrn28_40", "ethernet100", 16, "GC-2L")["step_no_overlap_ms"] == ""
    assert "not measured" in _row(rows, "wrn28_40", "ethernet100", 16, "GC-2L")[
        "compute_source"]
    mix = _row(rows, "wrn28_40", "ethernet100", 16, "dp 2 x gp 8")
    assert mix["compute_ms"] == pytest.approx(40.871676)
    assert mix["compute_source"].startswith("upper bound")
    assert mix["gradient_allreduce_MB"] == pytest.approx(4 * 9_199_048 / 1e6)
    assert mix["gp_collectives_MB"] == pytest.approx(
        (2 * 9 * 64 * 8 * 1344 * 2 + 64 * 10 * 2) / 1e6)


def test_committed_projection_is_what_the_script_computes():
    with open(BENCHMARKS / "results" / "dp_vs_gp_wrn28.csv") as f:
        committed = list(csv.DictReader(f))
    rows = _rows(list(dp_vs_gp.NAMES), [2, 4, 8, 16], ["nvlink", "ethernet100"])
    assert len(rows) == len(committed)
    for mine, theirs in zip(rows, committed):
        for key in ("network", "link", "scheme", "compute_source"):
            assert str(mine[key]) == theirs[key]
        for key in ("step_no_overlap_ms", "step_ideal_overlap_ms", "sent_MB_per_rank",
                    "params_per_rank"):
            assert (theirs[key] == "") == (mine[key] == "")
            if mine[key] != "":
                assert float(theirs[key]) == pytest.approx(mine[key], rel=1e-9)


def test_planned_memory_is_memory_pys():
    with open(BENCHMARKS / "results" / "memory_wrn28.csv") as f:
        planned = {(r["model"], r["conv"], r["N"], r["dtype"], r["batch"]): float(r["peak_GB"])
                   for r in csv.DictReader(f)}
    profile = dp_vs_gp.rank_profile("wrn28_40", dp_vs_gp.Scheme("gc2l", 1, 2), 128, True)
    assert profile["peak"] / 1e9 == pytest.approx(planned[("wrn28_40", "gc2l", "2", "bf16",
                                                           "128")], rel=1e-6)


@pytest.mark.slow          # the whole script, memory planning included (README, "Tests")
def test_the_script_writes_its_tables_to_a_new_folder(tmp_path, monkeypatch):
    # Without --update or --out a run never touches the committed results: it writes under
    # common.RESULTS/new/<UTC time>/, here in tmp_path, in a name of its own for part of the
    # networks. The inputs (the GPU step times, the accuracy sweep) are still the committed ones.
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    assert dp_vs_gp.main(["--networks", "wrn28_10", "--gpus", "2", "4", "--links",
                          "ethernet100"]) == 0
    (stem,) = [p.with_suffix("") for p in tmp_path.glob("results/new/*/dp_vs_gp_wrn28_10.md")]
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    md = stem.with_suffix(".md").read_text()
    assert "Command: `python benchmarks/dp_vs_gp.py --networks wrn28_10" in md
    assert "NVIDIA H100 80GB HBM3" in md                      # where the compute was measured
    assert "| WRN-28-10 | ethernet100 | 4 | SC, one GPU by " in md
    with open(stem.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["scheme"] for r in rows] == ["SC, one GPU", "DDP", "GC-2L", "GC", "DDP", "GC-2L",
                                          "GC", "dp 2 x gp 2"]
    assert all(r["fits_80GB"] == "True" for r in rows)
    with open(stem.parent / "dp_vs_gp_wrn28_10_accuracy.csv") as f:
        gc2l_16 = next(r for r in csv.DictReader(f) if r["kind"] == "gc2l" and r["N"] == "16")
    assert float(gc2l_16["wrn10_2_error"]) == pytest.approx((31.08 + 30.94) / 2)


def test_the_default_networks_write_the_committed_name():
    assert dp_vs_gp._default_name(list(dp_vs_gp.NAMES)) == "dp_vs_gp_wrn28"
    assert dp_vs_gp._default_name(["wrn28_40"]) == "dp_vs_gp_wrn28_40"


def test_the_plot_reads_plainly():
    networks, gpus, links = list(dp_vs_gp.NAMES), [2, 4, 8, 16], ["nvlink", "ethernet100"]
    rows = _rows(networks, gpus, links)
    fig = dp_vs_gp.figure(plotting.pyplot(), rows, networks, gpus, links, 128)
    fig.canvas.draw()
    panels = fig.axes
    assert [ax.get_title() for ax in panels] == [
        "WRN-28-10 over nvlink (450 GB/s)", "WRN-28-10 over ethernet100 (12.5 GB/s)",
        "WRN-28-40 over nvlink (450 GB/s)", "WRN-28-40 over ethernet100 (12.5 GB/s)"]
    assert panels[2].get_xlabel() == panels[3].get_xlabel() == "GPUs (N)"
    assert panels[0].get_ylabel() == panels[2].get_ylabel() == "speedup over SC on one GPU (x)"
    assert [t.get_text() for t in panels[2].get_xticklabels()] == ["2", "4", "8", "16"]
    assert {"0.5x", "1x", "2x", "4x", "8x"} <= {t.get_text() for t in panels[2].get_yticklabels()}
    colours = plotting.KIND_COLOURS
    for ax, linestyle in zip(panels, ["-", "--", "-", "--"]):      # a line style per link
        lines = {line.get_label(): line for line in ax.get_lines() if len(line.get_xdata())}
        for label, kind in (("DDP (band: ideal to no overlap)", "sc_dp"), ("GC-2L, gp = N", "gc2l"),
                            ("GC, gp = N (less accurate)", "gc"),
                            ("dp x gp, best gp (lower bound)", "mix")):
            assert lines[label].get_color() == colours[kind]
            assert lines[label].get_linestyle() == linestyle
        assert lines["SC on one GPU"].get_color() == colours["sc"]
    plotting.pyplot().close(fig)


def test_replot_redraws_the_plot_from_the_committed_csv(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    committed = BENCHMARKS / "results" / "dp_vs_gp_wrn28"
    accuracy = committed.parent / "dp_vs_gp_wrn28_accuracy.csv"
    assert replot.main([str(committed.with_suffix(".csv")), str(accuracy)]) == 0
    (png,) = tmp_path.glob("results/new/*/dp_vs_gp_wrn28.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "dp_vs_gp_wrn28_accuracy.csv: no plot for this result, skipped" in \
        capsys.readouterr().out
    assert not list(tmp_path.glob("results/new/*/dp_vs_gp_wrn28_accuracy.png"))
