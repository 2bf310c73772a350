"""The accuracy sweep (benchmarks/accuracy.py) on tiny cells: every cell really trained in its own
run directory, finished cells skipped, an interrupted one resumed from its checkpoint, results
(csv, md, both plots) written and read back, bad protocols refused before anything runs."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twolevel_dist.engine.checkpoint import latest_complete_epoch
from twolevel_dist.engine.metrics import read_metrics, truncate_metrics

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import accuracy  # noqa: E402

TINY = ["model=wrn10_2", "train.batch_size=32", "dataset.train_size=64", "dataset.test_size=64",
        "tensorboard=false", "schedule=cosine", "train.epochs=2"]


def write_protocol(folder: Path, grid: list[dict], train=TINY, name="tiny") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({"description": "tiny cells", "train": train, "grid": grid}))
    return path


def sweep(protocol: Path, runs: Path, capsys, *options: str) -> tuple[int, str, str]:
    """The sweep's command line, in this process (each cell is still its own training run):
    (exit code, stdout, stderr)."""
    code = accuracy.main([str(protocol), "--runs", str(runs), *options,
                          "--out", str(runs.parent / "results" / "acc")])
    out = capsys.readouterr()
    return code, out.out, out.err


def rows(runs: Path) -> list[dict]:
    with open(runs.parent / "results" / "acc.csv") as f:
        return list(csv.DictReader(f))


def test_a_sweep_runs_each_cell_once_skips_finished_ones_and_resumes_an_interrupted_one(
        tmp_path, capsys):
    protocol = write_protocol(tmp_path, [{"conv": ["sc"], "groups": [1], "seeds": [0]},
                                         {"conv": ["gc2l"], "groups": [2], "seeds": [0]}])
    runs = tmp_path / "runs"
    code, out, err = sweep(protocol, runs, capsys)
    assert code == 0, out[-2000:] + err[-2000:]
    assert "[1/2 cells done, ETA" in out and "[2/2 cells done]" in out
    table = rows(runs)
    assert [(r["conv"], r["N"], r["seed"], r["finished"]) for r in table] == [
        ("sc", "1", "0", "True"), ("gc2l", "2", "0", "True")]
    for row in table:
        records = read_metrics(runs / f"{row['conv']}_N{row['N']}_s0")
        assert row["epochs"] == "2/2"
        assert float(row["final_test_error"]) == pytest.approx(100 - records[-1]["test_acc"],
                                                               abs=0.01)
        assert float(row["best_test_error"]) <= float(row["final_test_error"])
        assert float(row["wall_time_s"]) > 0
    # One rank's share of GC-2L at N = 2 against the whole SC network; the whole GC-2L network.
    assert int(table[1]["params_per_rank"]) < int(table[0]["params_per_rank"]) / 2
    assert table[0]["params"] == table[0]["params_per_rank"] == "303706"
    assert int(table[1]["params_per_rank"]) < int(table[1]["params"]) < int(table[0]["params"])
    results = runs.parent / "results"
    md = (results / "acc.md").read_text()
    assert "| gc2l | " in md and "2 of 2 cells finished" in md
    for plot in ("acc.png", "acc_loss.png"):
        assert (results / plot).read_bytes()[:4] == b"\x89PNG"

    # Interrupt the GC-2L cell after its first epoch (as a kill during epoch 2 leaves it): the
    # next sweep resumes it from that checkpoint and leaves the finished SC cell alone (its
    # log does not grow).
    sc_log = (runs / ".sweep" / "sc_N1_s0.log").read_text()
    cell = runs / "gc2l_N2_s0"
    (cell / "model.pt").unlink()
    for path in sorted((cell / "checkpoints").glob("epoch_*"))[1:]:
        for f in path.iterdir():
            f.unlink()
        path.rmdir()
    truncate_metrics(cell, 1)
    assert latest_complete_epoch(cell) == 1
    code, out, err = sweep(protocol, runs, capsys)
    assert code == 0, err[-2000:]
    assert "2 cells, 1 already done" in out
    assert "resumed from" in (cell / "train.log").read_text()
    assert [r["epoch"] for r in read_metrics(cell)] == [1, 2]
    assert "resume=true" in (runs / ".sweep" / "gc2l_N2_s0.log").read_text()
    assert (runs / ".sweep" / "sc_N1_s0.log").read_text() == sc_log

    # A later session starts from a fresh clone: the run directories are gone, the committed
    # results are not. Their finished cells are kept, not trained again; a csv written before
    # the whole network's count was a column gets it back from the protocol.
    shutil.rmtree(runs)
    counted = rows(runs)
    with open(results / "acc.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, [k for k in counted[0] if k != "params"])
        writer.writeheader()
        writer.writerows({k: v for k, v in row.items() if k != "params"} for row in counted)
    code, out, err = sweep(protocol, runs, capsys)
    assert code == 0, err[-2000:]
    assert "2 cells, 2 already done" in out
    assert [(r["conv"], r["finished"]) for r in rows(runs)] == [("sc", "True"), ("gc2l", "True")]
    assert rows(runs) == counted
    assert "2 finished cell(s) kept from the committed" in (results / "acc.md").read_text()
    # A run directory that has not finished the cell (a partial copy) does not replace its
    # committed finished row.
    committed = rows(runs)
    (runs / "sc_N1_s0").mkdir()
    (runs / "sc_N1_s0" / "metrics.jsonl").write_text(json.dumps(
        dict(epoch=1, step=2, train_loss=2.3, test_acc=10.0, test_loss=2.3)) + "\n")
    code, out, err = sweep(protocol, runs, capsys, "--aggregate-only")
    assert code == 0, err[-2000:]
    assert rows(runs) == committed

    # --rerun trains a cell afresh though the committed results hold it finished: its earlier
    # run is set aside (not deleted), and the new run's row replaces the committed one (marked
    # here, since the same seed trains to the same numbers).
    committed[0]["final_test_error"] = "99.0"
    with open(results / "acc.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(committed[0]))
        writer.writeheader()
        writer.writerows(committed)
    code, out, err = sweep(protocol, runs, capsys, "--rerun", "sc_N1_s0")
    assert code == 0, err[-2000:]
    assert "2 cells, 1 already done" in out and "sc_N1_s0: its earlier run set aside" in out
    (aside,) = (runs / ".sweep" / "replaced").iterdir()
    assert (aside / "sc_N1_s0" / "metrics.jsonl").read_text().count("\n") == 1
    assert [r["epoch"] for r in read_metrics(runs / "sc_N1_s0")] == [1, 2]
    sc, gc2l = rows(runs)
    assert sc["finished"] == "True" and float(sc["final_test_error"]) == pytest.approx(
        100 - read_metrics(runs / "sc_N1_s0")[-1]["test_acc"], abs=0.01)
    assert gc2l == committed[1]
    # Finished, the rerun is over: the same command again trains nothing.
    code, out, err = sweep(protocol, runs, capsys)
    assert code == 0 and "2 cells, 2 already done" in out, err[-2000:]
    assert json.loads((runs / ".sweep" / "reruns.json").read_text()) == []


def test_a_sweep_killed_outright_still_counts_the_killed_attempts_time(tmp_path, capsys):
    """SIGKILL (a SLURM time limit, a machine taken away) skips every ``finally``: the attempt's
    start is on disk beforehand, and its time runs to the run directory's last write."""
    # Epochs enough that the cell is still training when killed (15 took 5 s on an idle CPU).
    protocol = write_protocol(tmp_path, [{"conv": ["sc"], "groups": [1], "seeds": [0]}],
                              train=[*TINY[:-1], "train.epochs=500"])
    runs, cell = tmp_path / "runs", tmp_path / "runs" / "sc_N1_s0"
    started = time.time()
    first = subprocess.Popen([sys.executable, str(BENCHMARKS / "accuracy.py"), str(protocol),
                              "--runs", str(runs), "--out", str(tmp_path / "results" / "acc")],
                             start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed once the cell has a checkpoint and has written more than 5 s into the attempt
        # (the run writes at its log lines and checkpoints only: a clock alone could kill it
        # in a silent stretch before 5 s of writes).
        while not latest_complete_epoch(cell) or accuracy._last_write(cell) - started <= 5:
            assert first.poll() is None, "the sweep ended before it could be killed"
            assert time.time() - started < 240, "the cell never finished an epoch"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)           # the sweep and its training run
        first.wait()
    killed_attempt = accuracy._last_write(cell) - started
    assert killed_attempt > 5

    # The killed attempt counts from the moment the sweep recorded its start (after its own
    # imports, a few seconds at most) to the cell's last write before the kill...
    code, _, err = sweep(protocol, runs, capsys, "--aggregate-only")
    assert code == 0, err[-2000:]
    ledger, (sweep_cell,) = accuracy.Ledger(runs), accuracy.load_protocol(protocol).cells
    counted = ledger.wall(sweep_cell)["seconds"]
    assert killed_attempt - 4 < counted <= killed_attempt
    assert float(rows(runs)[0]["wall_time_s"]) == pytest.approx(counted, abs=0.5)
    # ... and the next attempt keeps it, adding its own time.
    with ledger.attempt(sweep_cell):
        time.sleep(0.3)
    assert counted + 0.3 <= ledger.wall(sweep_cell)["seconds"] < counted + 2


def test_sigterm_to_the_sweep_stops_its_running_cell_with_a_checkpoint_and_waits_for_it(
        tmp_path):
    """kill <the sweep> reaches the sweep alone: it passes the signal on and waits while the
    cell finishes its step and checkpoint (it used to leave the cell training on, orphaned)."""
    protocol = write_protocol(tmp_path, [{"conv": ["sc"], "groups": [1], "seeds": [0]}],
                              train=[*TINY[:-1], "train.epochs=500"])
    runs, cell = tmp_path / "runs", tmp_path / "runs" / "sc_N1_s0"
    job = subprocess.Popen([sys.executable, str(BENCHMARKS / "accuracy.py"), str(protocol),
                            "--runs", str(runs), "--out", str(tmp_path / "results" / "acc")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.time()
    while not latest_complete_epoch(cell):
        assert job.poll() is None, job.communicate()
        assert time.time() - started < 240, "the cell never finished an epoch"
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 130 and "interrupted: run the same command again" in err, err
    assert "sc_N1_s0: stopped: SIGTERM at step" in err, err
    assert not any(f"run_dir={cell}" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
                   .replace("\0", " ") for pid in os.listdir("/proc") if pid.isdigit()
                   and Path(f"/proc/{pid}/cmdline").exists())


def test_a_refusal_every_cell_would_meet_is_said_before_any_runs_and_nothing_is_written(
        tmp_path, capsys):
    runs = tmp_path / "runs"
    for train, message in [([*TINY, "optim.lr=-1"], "conv=gc groups=2: optim.lr=-1.0 must be "
                                                    "positive"),
                           ([*TINY, "train.epoch=1"], "train: unknown config key(s): "
                                                      "train.epoch (did you mean train.epochs?)")]:
        bad = write_protocol(tmp_path, [{"conv": ["gc", "gc2l"], "groups": [2], "seeds": [0]}],
                             train=train, name="bad")
        code, _, err = sweep(bad, runs, capsys)
        assert code == 2 and message in err, err
        assert not runs.exists()        # no sweep.json: the fixed protocol may use the folder


def test_a_cell_refused_at_its_start_fails_alone_and_the_others_run(tmp_path, capsys):
    """gc at N = 3 cannot split WRN's 16 channels: that cell's own refusal, said with its line;
    the next cell trains."""
    runs = tmp_path / "runs"
    protocol = write_protocol(tmp_path, [{"conv": ["gc"], "groups": [3, 2], "seeds": [0]}])
    code, out, err = sweep(protocol, runs, capsys)
    assert code == 1, out[-2000:] + err[-2000:]
    assert "gc N=3 seed=0: FAILED" in out and "error: gc: groups=3 must divide" in err
    assert "1 cell(s) failed: gc_N3_s0" in err
    # Refused before its run directory was claimed: no row, nothing of it on disk.
    assert [(r["conv"], r["N"], r["finished"]) for r in rows(runs)] == [("gc", "2", "True")]
    assert not (runs / "gc_N3_s0").exists()


def test_results_or_a_runs_folder_of_other_settings_are_never_mixed_in(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "results" / "acc"
    first = write_protocol(tmp_path, [{"conv": ["sc"], "groups": [1], "seeds": [0]}])
    other = write_protocol(tmp_path, [{"conv": ["sc"], "groups": [1], "seeds": [0]}],
                           train=[*TINY[:-1], "train.epochs=3"], name="other")
    accuracy.Ledger(runs).claim(accuracy.load_protocol(first))
    assert accuracy.main([str(other), "--runs", str(runs)]) == 2
    assert "would be mixed" in capsys.readouterr().err
    # Committed results of the first settings, a fresh runs folder for the other ones.
    out.parent.mkdir()
    out.with_suffix(".md").write_text(f"# acc\n\nEvery cell: `{' '.join(TINY)}`; cells ran at "
                                      f"commit(s) abc.\n")
    code, _, err = sweep(other, tmp_path / "runs2", capsys)
    assert code == 2 and "acc.md's cells were trained with `" in err and "mixed" in err, err
    assert not (tmp_path / "runs2").exists()
    # A torn csv (a merge conflict) is one line naming it, before anything runs.
    out.with_suffix(".md").unlink()
    out.with_suffix(".csv").write_text("model,conv,N,seed\nwrn,sc,1\n")
    code, _, err = sweep(other, tmp_path / "runs2", capsys)
    assert code == 2 and "acc.csv, line 2, does not have the header's 4 columns" in err, err
    assert not (tmp_path / "runs2").exists()


def test_the_error_table_shows_sc_when_it_is_the_only_cell_finished():
    rows = [dict(conv="sc", N=1, finished=True, final_test_error=10.0),
            dict(conv="gc2l", N=4, finished=False, final_test_error="")]
    assert accuracy.error_table(rows, paper=False) == ["| conv | N = 4 |", "|---|---|",
                                                       "| sc | 10.00 |"]


@pytest.mark.parametrize("text, message", [
    ({"train": [], "grid": [{"conv": ["gcx"], "groups": [2], "seeds": [0]}]}, "'conv' must be"),
    ({"train": [], "grid": [{"conv": ["gc"], "groups": [0], "seeds": [0]}]}, "positive integers"),
    ({"train": [], "grid": [{"conv": ["gc"], "groups": [2]}]}, "'seeds' must be"),
    ({"train": ["groups=4"], "grid": [{"conv": ["gc"], "groups": [2], "seeds": [0]}]},
     "sets per cell"),
    ({"train": [], "grids": []}, "unknown key(s) ['grids']"),
    ({"train": ["model"], "grid": []}, "Hydra overrides"),
    ("train: [model=wrn10_2\ngrid: x", "is not a readable protocol"),
    ([{"train": []}], "a protocol is a mapping"),
])
def test_a_bad_protocol_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text if isinstance(text, str) else json.dumps(text))
    with pytest.raises(accuracy.SweepError) as info:
        accuracy.load_protocol(path)
    assert message in str(info.value)


def test_the_grid_is_the_union_of_its_blocks_in_the_order_written(tmp_path):
    protocol = accuracy.load_protocol(write_protocol(tmp_path, [
        {"conv": ["sc"], "groups": [4, 8], "seeds": [0]},
        {"conv": ["gc", "gc2l"], "groups": [16], "seeds": [0, 1]},
        {"conv": ["gc2l"], "groups": [16], "seeds": [1]}]))
    assert [c.name for c in protocol.cells] == [
        "sc_N1_s0", "gc_N16_s0", "gc_N16_s1", "gc2l_N16_s0", "gc2l_N16_s1"]
    assert [c.ranks for c in protocol.cells] == [1, 16, 16, 16, 16]


def test_the_committed_protocols_load():
    for path in sorted((BENCHMARKS / "protocols").glob("*.yaml")):
        cells = accuracy.load_protocol(path).cells
        assert {c.conv for c in cells} == {"sc", "gc", "gc2l", "shuffle", "flgc"}, path
        # The paper's grids: Figure 5 (WRN) at N = 2..16, Table 4 (MobileNetV2) at N = 2..8.
        expected = {2, 4, 8} if "mobilenet" in path.name else {2, 4, 8, 16}
        assert {c.groups for c in cells if c.conv != "sc"} == expected, path
    # WRN-28-10's 160-channel stage takes Shuffle over N ranks only where N^2 divides 160: its
    # N = 8 and 16 cells run on one rank under --torchrun and SLURM (they were refused there).
    paper = accuracy.load_protocol(BENCHMARKS / "protocols" / "cifar10_wrn28_10.yaml")
    ranks = {c.name: paper.ranks(c) for c in paper.cells}
    assert paper.unsplittable == {("shuffle", 8), ("shuffle", 16)}
    assert (ranks["shuffle_N4_s0"], ranks["shuffle_N8_s0"], ranks["gc2l_N16_s0"]) == (4, 1, 16)
    assert accuracy.train_command(paper, accuracy.Cell("shuffle", 8, 0), Path("/x"), True)[1:3] \
        == ["-m", "twolevel_dist.train"]


def test_each_slurm_job_asks_for_a_gpu_per_rank_and_no_more():
    """The README's paper command (--slurm-gpus-per-node 8): N = 16 over two nodes of 8, and a
    one-rank cell (SC; Shuffle at N = 8, which WRN-28-10 cannot split) one GPU, not a node's 8."""
    paper = accuracy.load_protocol(BENCHMARKS / "protocols" / "cifar10_wrn28_10.yaml")
    args = accuracy.parse_args([str(paper.path), "--launcher", "slurm",
                                "--slurm-gpus-per-node", "8"])
    layout = {c.name: accuracy.slurm_layout(c, paper.ranks(c), args) for c in paper.cells}
    assert (layout["gc2l_N16_s0"], layout["gc2l_N4_s0"], layout["sc_N1_s0"],
            layout["shuffle_N8_s0"], layout["flgc_N16_s0"]) == (
        (2, 8, 8), (1, 4, 4), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    cpu_only = accuracy.parse_args([str(paper.path), "--launcher", "slurm"])
    assert accuracy.slurm_layout(accuracy.Cell("gc2l", 16, 0), 16, cpu_only) == (1, 16, None)


@pytest.mark.parametrize("options, message", [
    (["--slurm-gpus-per-node", "4", "--slurm-ranks-per-node", "8"], "every rank needs a GPU"),
    (["--torchrun"], "--torchrun is for --launcher local"),
])
def test_a_slurm_layout_that_cannot_work_is_refused_by_the_command_line(
        tmp_path, capsys, options, message):
    protocol = write_protocol(tmp_path, [{"conv": ["gc2l"], "groups": [4], "seeds": [0]}])
    with pytest.raises(SystemExit) as info:
        accuracy.main([str(protocol), "--launcher", "slurm", *options])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_ranks_that_do_not_fill_their_nodes_evenly_are_refused_before_any_job(tmp_path, capsys):
    protocol = write_protocol(tmp_path, [{"conv": ["gc2l"], "groups": [4], "seeds": [0]}])
    code, _, err = sweep(protocol, tmp_path / "runs", capsys, "--launcher", "slurm",
                         "--slurm-ranks-per-node", "3")
    assert code == 2 and "gc2l_N4_s0 runs 4 ranks, which 3 ranks per node" in err
    assert not (tmp_path / "runs").exists()


def test_aggregate_only_reads_the_runs_folder_and_writes_nothing_there(tmp_path, capsys):
    protocol = write_protocol(tmp_path, [{"conv": ["sc"], "groups": [1], "seeds": [0]}])
    code, out, _ = sweep(protocol, tmp_path / "runs", capsys, "--aggregate-only")
    assert code == 0 and "nothing to aggregate" in out
    assert not (tmp_path / "runs").exists()


def test_a_rerun_of_a_cell_in_use_or_not_in_the_sweep_is_refused_and_nothing_is_moved(
        tmp_path, capsys):
    import fcntl
    protocol = write_protocol(tmp_path, [{"conv": ["sc"], "groups": [1], "seeds": [0]}])
    runs, cell = tmp_path / "runs", tmp_path / "runs" / "sc_N1_s0"
    cell.mkdir(parents=True)
    (cell / "metrics.jsonl").write_text("")
    lock = os.open(cell / ".lock", os.O_RDWR | os.O_CREAT)       # a training holds the cell
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        code, _, err = sweep(protocol, runs, capsys, "--rerun", "sc_N1_s0")
    finally:
        os.close(lock)
    assert code == 2 and "is in use by" in err
    assert (cell / "metrics.jsonl").is_file() and not (runs / ".sweep" / "replaced").exists()
    code, _, err = sweep(protocol, runs, capsys, "--rerun", "gc_N2_s0")
    assert code == 2 and "--rerun ['gc_N2_s0']: not cells of" in err
    with pytest.raises(SystemExit) as info:
        sweep(protocol, runs, capsys, "--rerun", "sc_N1_s0", "--aggregate-only")
    assert info.value.code == 2 and "choose one" in capsys.readouterr().err
