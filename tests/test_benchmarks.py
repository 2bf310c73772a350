"""The benchmarks end to end on tiny shapes: their result files are written, read back and
internally consistent (speedups from the step times, communication from the closed form, every
transport measured). Speed itself is never asserted."""

import csv
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed import run_on_ranks

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


@pytest.mark.slow          # 45 s of torchrun jobs: run with -m slow (README, "Tests")
def test_real_scaling_writes_consistent_results(tmp_path):
    # Real ranks under torchrun; their collectives are stand-ins here (the engine's real ones are
    # tested in test_parallel.py), which keeps this test to a few seconds per job.
    collectives = "local"
    stem = tmp_path / "real"
    _scaling("real", "--model", "wrn10_2", "--batch", "4", "--groups", "1", "2", "--convs", "sc",
             "sc_dp", "gc2l", "--collectives", collectives, "--bind-cores",
             "--rounds", "2", "--reps", "2", "--warmup", "1", "--out", str(stem))
    rows = _rows(stem)
    assert [(r["conv"], r["N"]) for r in rows] == [("sc", "1"), ("sc", "2"), ("sc_dp", "2"),
                                                   ("gc2l", "2")]
    baseline = float(rows[0]["step_s"])
    for row in rows:
        assert row["collectives"] == collectives and row["layout"] == "NCHW"
        speedup = float(row["speedup_vs_sc1"])
        assert speedup == pytest.approx(baseline / float(row["step_s"]), rel=1e-6)
        assert float(row["efficiency"]) == pytest.approx(speedup / float(row["ideal"]), rel=1e-6)
        assert 0 < float(row["step_min_s"]) <= float(row["step_s"])
    # The bytes are counted whether the collectives are real or stand-ins (DDP's hook).
    assert float(rows[3]["comm_MB"]) == pytest.approx(_closed_form_megabytes(2, 4), rel=1e-6)
    dp = rows[2]
    assert (dp["dp"], dp["gp"], dp["rank_batch"], dp["ideal"]) == ("2", "1", "2", "2")
    assert float(dp["comm_MB"]) == float(dp["ddp_allreduce_MB"]) == \
        pytest.approx(4 * int(dp["params_per_rank"]) / 1e6, rel=1e-9)
    assert int(dp["params_per_rank"]) == int(rows[0]["params_per_rank"])    # a whole replica
    markdown = stem.with_suffix(".md").read_text()
    assert f"--collectives {collectives}" in markdown and "2 interleaved rounds" in markdown


@pytest.mark.slow          # six torchrun jobs of up to 4 ranks: run with -m slow (README, "Tests")
def test_real_scaling_runs_data_parallel_rows_beside_group_parallel_ones(tmp_path):
    # Real collectives: DDP's own all-reduce timed, its bytes from a comm hook afterwards. At
    # N = 2, gc2l_dp2 would be one group: skipped.
    stem = tmp_path / "real_dp"
    _scaling("real", "--model", "wrn10_2", "--batch", "8", "--groups", "1", "2", "4", "--convs",
             "sc", "sc_dp", "gc2l_dp2", "--rounds", "1", "--reps", "1", "--warmup", "1",
             "--out", str(stem))
    rows = {(r["conv"], int(r["N"])): r for r in _rows(stem)}
    assert list(rows) == [("sc", 1), ("sc", 2), ("sc_dp", 2), ("sc", 4), ("sc_dp", 4),
                          ("gc2l_dp2", 4)]
    params = int(rows[("sc", 1)]["params_per_rank"])
    for n in (2, 4):
        dp = rows[("sc_dp", n)]
        assert (int(dp["dp"]), int(dp["gp"]), int(dp["rank_batch"]), int(dp["ideal"])) == \
            (n, 1, 8 // n, n)
        assert int(dp["params_per_rank"]) == params
        assert float(dp["comm_MB"]) == float(dp["ddp_allreduce_MB"]) == \
            pytest.approx(4 * params / 1e6, rel=1e-9)
    mix = rows[("gc2l_dp2", 4)]
    assert (int(mix["dp"]), int(mix["gp"]), int(mix["rank_batch"]), int(mix["ideal"])) == \
        (2, 2, 4, 8)
    shard = int(mix["params_per_rank"])
    assert float(mix["ddp_allreduce_MB"]) == pytest.approx(4 * shard / 1e6, rel=1e-9)
    # A replica's two ranks exchange what GC-2L at N = 2 does on the replica's 4 images.
    assert float(mix["comm_MB"]) == pytest.approx(
        _closed_form_megabytes(2, 4) + 4 * shard / 1e6, rel=1e-9)
    for row in rows.values():
        assert float(row["efficiency"]) == pytest.approx(
            float(row["speedup_vs_sc1"]) / float(row["ideal"]), rel=1e-6)
    assert "Data parallel rows" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


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


# --- where results go, and how plots look --------------------------------------------------------
# In this process, with benchmarks/ importable as the scripts import each other; results go under
# a monkeypatched common.RESULTS, never the repository's committed files.
sys.path.insert(0, str(BENCHMARKS))
import comm  # noqa: E402
import common  # noqa: E402
import plotting  # noqa: E402
import replot  # noqa: E402
import scaling  # noqa: E402
import selfgroup_table  # noqa: E402

SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in ("common.py",
                                                                            "plotting.py"))


@pytest.fixture
def results(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    return tmp_path / "results"


def test_a_run_writes_a_new_file_unless_given_update_or_out(results, tmp_path, capsys):
    args = ["--model", "wrn10_2", "--groups", "2", "--batch", "2", "--convs", "gc"]
    committed = results / "comm_wrn10_2"
    results.mkdir()
    for suffix in (".csv", ".md"):
        committed.with_suffix(suffix).write_text("committed\n")
    assert comm.main(args) == 0 and comm.main(args) == 0       # twice within the same second
    new = sorted(results.glob("new/*/comm_wrn10_2.csv"))
    assert len(new) == 2 and new[0].parent != new[1].parent
    assert f"wrote {new[0].with_suffix('')}.csv and .md" in capsys.readouterr().out
    assert _rows(new[0])[0]["scheme"] == "gc"
    for suffix in (".csv", ".md"):
        assert committed.with_suffix(suffix).read_text() == "committed\n"

    assert comm.main([*args, "--update"]) == 0
    assert _rows(committed)[0]["scheme"] == "gc"
    assert "python benchmarks/comm.py" in committed.with_suffix(".md").read_text()
    elsewhere = tmp_path / "elsewhere" / "comm"
    assert comm.main([*args, "--out", str(elsewhere)]) == 0
    assert _rows(elsewhere)[0]["scheme"] == "gc"
    assert len(sorted(results.glob("new/*/*.csv"))) == 2
    with pytest.raises(SystemExit):                              # one or the other
        comm.main([*args, "--update", "--out", str(elsewhere)])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_chooses_where_to_write_through_common(script):
    source = (BENCHMARKS / script).read_text()
    assert not re.search(r'/\s*"results"', source), "the results folder is common.RESULTS"
    writes = re.search(r"write_results\(|write_text\(|save\(", source)
    if writes and script not in ("accuracy.py", "gpu_table.py"):
        # accuracy.py merges into its protocol's record; gpu_table.py's --out is required
        assert "add_output_options(" in source and "output_stem(" in source


def test_selfgroup_table_writes_its_three_files_to_a_new_folder(results, tmp_path):
    prefix = tmp_path / "runs" / "selfgroup_tiny"
    Path(f"{prefix}_sc").mkdir(parents=True)
    Path(f"{prefix}_sc/metrics.jsonl").write_text('{"test_acc": 50.0}\n')
    for job in ("sg", "convert"):
        Path(f"{prefix}_{job}").mkdir()
        Path(f"{prefix}_{job}/report.json").write_text(
            '{"command": "c", "results": [{"result": "r", "test_acc": 40.0}]}')
        Path(f"{prefix}_{job}/report.md").write_text(f"{job} layers\n")
    assert selfgroup_table.main([str(prefix), "bash benchmarks/selfgroup_cifar.sh 1"]) == 0
    (table,) = results.glob("new/*/selfgroup_tiny.md")
    assert "`bash benchmarks/selfgroup_cifar.sh 1`" in table.read_text()
    for job in ("sg", "convert"):
        assert (table.parent / f"selfgroup_tiny_{job}_layers.md").read_text() == f"{job} layers\n"


def test_a_kind_has_one_colour_and_a_variant_keeps_it():
    colours = plotting.KIND_COLOURS
    assert len(set(colours.values())) == len(colours)
    assert plotting.style("gc2l+overlap")["color"] == plotting.style("gc2l_taps")["color"] == \
        colours["gc2l"]
    assert plotting.style("gc2l+overlap")["linestyle"] != plotting.style("gc2l")["linestyle"]
    assert plotting.style("sc split")["color"] == colours["sc_split"] != colours["sc"]
    assert plotting.style("ddp")["color"] == plotting.style("dp")["color"] == colours["sc_dp"]
    with pytest.raises(ValueError, match="KIND_COLOURS"):
        plotting.style("new_kind")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_plot_takes_its_colours_from_the_one_table(script):
    source = (BENCHMARKS / script).read_text()
    if "subplots(" in source:
        assert "from plotting import" in source and "style(" in source
        assert not re.search(r'\bcolor="', source), "colours come from plotting.style"


def test_the_scaling_plot_reads_plainly(results):
    rows = [dict(conv=conv, N=n, speedup_vs_sc1=speedup, oversubscribed=n > 2)
            for conv, n, speedup in (("sc", 1, 1.0), ("sc", 2, 0.9), ("sc", 4, 0.6),
                                     ("gc2l", 2, 2.3), ("gc2l", 4, 1.9))]
    fig = scaling.speedup_figure(plotting.pyplot(), rows, "wrn10_2, batch 4\nreal ranks")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_ylabel() == "speedup over SC on one rank (x)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    assert {"1x", "2x", "4x", "16x"} <= {t.get_text() for t in ax.get_yticklabels()}
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert lines["gc2l"].get_color() == plotting.KIND_COLOURS["gc2l"]
    assert lines["sc split (N = 1: sc, the baseline)"].get_color() == \
        plotting.KIND_COLOURS["sc_split"]
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "white"
              and len(line.get_xdata())]
    assert sorted(x for line in hollow for x in line.get_xdata()) == [4, 4]
    assert any("oversubscribed" in t.get_text() for t in ax.get_legend().get_texts())


def test_data_parallel_schemes_split_the_ranks_and_the_global_batch():
    assert scaling.split_ranks("sc_dp", 4) == ("sc", 4, 1)
    assert scaling.split_ranks("gc2l_dp2", 8) == ("gc2l", 2, 4)
    assert scaling.split_ranks("gc2l", 4) == ("gc2l", 1, 4)
    assert scaling.split_ranks("sc", 2) == ("sc", 1, 2)
    for conv, n in (("gc2l_dp2", 2), ("gc2l_dp2", 3), ("gc2l_dp4", 4)):
        with pytest.raises(ValueError):        # one group per replica, or no whole replicas
            scaling.split_ranks(conv, n)
    assert scaling.rank_batch(32, 2) == 16 and scaling.rank_batch(32, 1) == 32
    with pytest.raises(ValueError):
        scaling.rank_batch(32, 3)
    # SC split and DDP: N; GC-2L: N^2 per model, times its replicas.
    assert [scaling.ideal_speedup(*scaling.split_ranks(conv, 4))
            for conv in ("sc", "sc_dp", "gc", "gc2l", "gc2l_dp2")] == [4, 4, 16, 16, 8]
    assert scaling.ideal_speedup("sc", 1, 1) == 1
    parser = scaling._parser()
    assert parser.parse_args(["real", "--convs", "sc", "sc_dp", "gc2l_dp2"]).convs == [
        "sc", "sc_dp", "gc2l_dp2"]
    assert parser.parse_args(["real"]).convs == list(scaling.SCHEMES)   # committed commands
    for bad in (["real", "--convs", "dp"], ["real", "--convs", "gc2l_dp1"],
                ["sim", "--convs", "sc_dp"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_a_replicas_images_are_its_slice_of_the_global_batch():
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].clone()))
    for part in (None, (0, 2), (1, 2)):
        common.training_step(model, 4, image_size=8, part=part)()
    assert torch.equal(torch.cat(seen[1:]), seen[0]) and len(seen[1]) == 2
    with pytest.raises(ValueError):
        common.training_step(model, 4, image_size=8, part=(0, 3))


def _ddp_rank():
    """On 2 gloo ranks, per kind of collectives: sc_dp's rank (batch 4, 2 images each) after one
    eval-mode step, the bytes DDP's hook saw, and what one process computes from the same weights
    on the whole batch and on this rank's half."""
    import torch.distributed as dist
    rank, out = dist.get_rank(), {}
    references = []
    for part in (None, (rank, 2)):
        torch.manual_seed(0)
        single = common.model_from_config("wrn10_2", "sc", 1).eval()
        common.training_step(single, 4, part=part)()
        references.append([p.detach() for p in single.parameters()])
    for collectives in ("real", "local"):
        torch.manual_seed(0)
        model, step, hook = scaling.build_rank("wrn10_2", "sc_dp", collectives, False, "cpu", 4)
        model.eval()                 # BatchNorm's running statistics: no batch dependence
        if hook is None:
            hook = scaling.DDPBytes(model, communicate=True)
        step()
        out[collectives] = [p.detach() for p in model.parameters()], hook.nbytes
    return out, references


def test_a_data_parallel_step_is_the_step_on_the_whole_batch():
    # In eval mode DDP's average of the two halves' gradients is the whole batch's: the same SGD
    # step. With the local stand-in nothing is exchanged: each rank steps on its own half.
    for out, (whole, half) in run_on_ranks(2, _ddp_rank):
        for collectives, expected in (("real", whole), ("local", half)):
            params, nbytes = out[collectives]
            for p, q in zip(params, expected, strict=True):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            # DDP's first step reduces every gradient (fp32) as one bucket
            assert nbytes == [4 * sum(p.numel() for p in params)]


def test_the_scaling_plot_draws_data_parallelism_in_its_colour(results):
    rows = [dict(conv=conv, N=n, dp=dp, speedup_vs_sc1=speedup)
            for conv, n, dp, speedup in (("sc", 1, 1, 1.0), ("sc_dp", 2, 2, 1.8),
                                         ("sc_dp", 4, 4, 3.0), ("gc2l", 2, 1, 2.3),
                                         ("gc2l_dp2", 4, 2, 3.5))]
    fig = scaling.speedup_figure(plotting.pyplot(), rows, "wrn10_2, batch 8\nreal ranks")
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    ddp = lines["sc dp (DDP)"]
    assert ddp.get_color() == plotting.KIND_COLOURS["sc_dp"]
    assert list(ddp.get_xdata()) == [1, 2, 4]                  # from the baseline
    assert lines["gc2l, dp 2 x gp N/2 (DDP of GC-2L)"].get_color() == plotting.KIND_COLOURS["mix"]
    assert list(lines["ideal N (DDP, sc split)"].get_ydata()) == [1, 2, 4]
    assert ax.get_xlabel() == "N (ranks = dp x gp)"


def test_replot_redraws_from_the_csv_and_leaves_it_alone(results):
    results.mkdir()
    name = "scaling_real_wrn16_4_cpu_bound_channels_last"
    committed = BENCHMARKS / "results" / name
    for suffix in (".csv", ".md"):
        (results / name).with_suffix(suffix).write_bytes(committed.with_suffix(suffix).read_bytes())
    csv_path = (results / name).with_suffix(".csv")
    assert replot.main([str(csv_path)]) == 0
    (png,) = results.glob(f"new/*/{name}.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not (results / name).with_suffix(".png").exists()
    assert replot.main(["--update", str(csv_path)]) == 0
    assert (results / name).with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    for suffix in (".csv", ".md"):
        assert (results / name).with_suffix(suffix).read_bytes() == \
            committed.with_suffix(suffix).read_bytes()


def test_a_model_name_with_no_config_ends_a_benchmark_with_the_choices(capsys):
    assert common.run_cli(lambda: common.model_from_config("wrn16_5", "sc", 1)) == 2
    assert re.match(r"error: model=wrn16_5 names no model config \(did you mean model=wrn16_4\?\); "
                    r"the choices are ", capsys.readouterr().err)


@pytest.mark.parametrize("script,args,message", [
    ("scaling", ["sim", "--batch", "0"], "argument --batch: 0 must be at least 1"),
    ("scaling", ["sim", "--device", "gpu"], "argument --device: 'gpu' is not a device"),
    ("scaling", ["sim", "--bandwidth", "0"], "argument --bandwidth: 0 must be above 0"),
    ("layers", ["--reps", "0"], "argument --reps: 0 must be at least 1"),
    ("comm", ["--groups", "1"], "argument --groups: 1 must be at least 2"),
    ("dp_vs_gp", ["--steps", "/nonexistent.csv"], "argument --steps: /nonexistent.csv: no such "
                                                  "file"),
    ("replot", ["/nonexistent.csv"], "argument csv: /nonexistent.csv: no such file"),
])
def test_bad_benchmark_arguments_are_one_line_and_exit_2(script, args, message, capsys):
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as exit_:
        module.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--updat", "6"], "unknown option"),
                                          (["6", "wrn10_2", "x"], "must be positive integers")])
def test_selfgroup_script_refuses_bad_arguments_before_training(args, message):
    out = subprocess.run(["bash", str(BENCHMARKS / "selfgroup_cifar.sh"), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and message in out.stderr
    assert out.stdout == ""


def test_a_benchmark_where_no_configuration_can_run_says_so_and_writes_nothing(tmp_path, capsys):
    import scaling
    out = tmp_path / "none"
    assert common.run_cli(lambda: scaling.main(
        ["sim", "--model", "wrn10_2", "--groups", "3", "--convs", "gc2l", "--batch", "4",
         "--out", str(out)])) == 2
    assert "error: no configuration ran" in capsys.readouterr().err
    assert not tmp_path.joinpath("none.csv").exists() and list(tmp_path.iterdir()) == []
