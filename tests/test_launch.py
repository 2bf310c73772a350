"""Launching for real: SLURM (sbatch + torchrun, and Hydra sweeps through submitit), torchrun's
elastic restarts after a killed rank, and checkpoints that survive a kill mid-write."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slurm_cluster import SlurmCluster, Unavailable
from test_train import SMALL, TORCHRUN, _train
from twolevel_dist.engine.checkpoint import (atomic_save, latest_complete_epoch,
                                             load_rank_checkpoint, mark_complete, rank_file)
from twolevel_dist.engine.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        env = cluster.start()
    except (Unavailable, OSError, subprocess.SubprocessError) as error:
        cluster.stop()
        pytest.skip(f"no SLURM cluster here: {error}")
    yield env
    cluster.stop()


@pytest.mark.slurm
def test_sbatch_runs_torchrun_on_a_real_slurm_cluster(slurm, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        ["sbatch", "--wait", f"--output={tmp_path}/slurm-%j.out", "launch/slurm.sbatch",
         *SMALL, "train.epochs=2", "groups=2", f"run_dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**slurm, "NPROC_PER_NODE": "2", "PYTHON": sys.executable,
             "RDZV_PORT": str(29500 + os.getpid() % 1000)})
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert out.returncode == 0, out.stderr + logs[-4000:]
    assert "1 node(s) x 2 ranks" in logs
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]
    assert latest_complete_epoch(run_dir) == 2
    assert "world=2 (dp=1 x gp=2)" in (run_dir / "train.log").read_text()


@pytest.mark.slurm
def test_hydra_sweep_over_groups_through_the_submitit_launcher(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "twolevel_dist.train", "-m", "hydra/launcher=slurm",
         "groups=1,2", "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}",
         *SMALL, "train.max_steps=3", "train.epochs=1"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=slurm)
    submitit_logs = "\n".join(p.read_text() for p in sweep.glob(".submitit/*/*.err"))
    assert out.returncode == 0, out.stderr[-3000:] + submitit_logs[-3000:]
    layouts = sorted((sweep / job / "train.log").read_text().split("world=")[1].split(";")[0]
                     for job in ("0", "1"))
    assert layouts == ["2 (dp=1 x gp=2)", "2 (dp=2 x gp=1)"]
    for job in ("0", "1"):
        assert read_metrics(sweep / job)[0]["step"] == 3



@pytest.mark.slurm
def test_an_accuracy_sweep_through_submitit_gives_the_numbers_of_one_local_process(slurm,
                                                                                 tmp_path):
    """Two cells, one SLURM job each (GC-2L: one task per group); the GC-2L cell's epochs
    match the same cell trained by one local process (the single-device model)."""
    protocol = tmp_path / "tiny.yaml"
    protocol.write_text(json.dumps({"train": [*SMALL, "dataset.train_size=64", "train.epochs=2"],
                                    "grid": [{"conv": ["sc", "gc2l"], "groups": [2],
                                              "seeds": [0]}]}))

    def sweep(runs, *options, env=None):
        out = subprocess.run([sys.executable, "benchmarks/accuracy.py", str(protocol), "--runs",
                              str(runs), "--out", str(runs / "acc"), *options], cwd=REPO,
                             capture_output=True, text=True, timeout=900, env=env)
        logs = "\n".join(p.read_text() for p in runs.glob(".sweep/submitit/*.err"))
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + logs[-3000:]
        return out.stdout

    stdout = sweep(tmp_path / "slurm", "--launcher", "slurm", "--poll-s", "1", env=slurm)
    assert stdout.count("submitted SLURM job") == 2 and "[2/2 cells done]" in stdout
    cell = tmp_path / "slurm" / "gc2l_N2_s0"
    assert "world=2 (dp=1 x gp=2)" in (cell / "train.log").read_text()
    assert (tmp_path / "slurm" / "acc.png").is_file()
    sweep(tmp_path / "local", "--only", "gc2l_N2_s0")
    local = read_metrics(tmp_path / "local" / "gc2l_N2_s0")
    for ranks, one in zip(read_metrics(cell), local):
        assert ranks["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)
        assert ranks["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_killed_rank_restarts_and_finishes_with_the_uninterrupted_metrics(tmp_path):
    common = ["model=wrn10_2", "train.batch_size=32", "dataset.train_size=640",
              "dataset.test_size=64", "tensorboard=false", "train.epochs=3", "groups=2",
              "schedule.milestones=[]",
              "model.dropout=0.2"]
    _train(tmp_path / "clean", *common)
    run_dir = tmp_path / "killed"
    job = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m",
         "twolevel_dist.train", f"run_dir={run_dir}", *common],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 300
        while latest_complete_epoch(run_dir) is None:     # wait for epoch 1's checkpoint
            assert job.poll() is None and time.time() < deadline, "job ended before epoch 1"
            time.sleep(0.2)
        time.sleep(1.0)                                   # well inside epoch 2
        workers = _children(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-20000:]
    assert "resumed from" in (run_dir / "train.log").read_text()
    clean, killed = read_metrics(tmp_path / "clean"), read_metrics(run_dir)
    assert [m["epoch"] for m in killed] == [1, 2, 3]
    for a, b in zip(clean, killed):
        for key in ("train_loss", "test_loss", "test_acc", "step"):
            assert a[key] == b[key], (key, a, b)


_WRITER = """
import sys, torch
from twolevel_dist.engine.checkpoint import atomic_save, rank_file
atomic_save({"model": {"w": torch.randn(60_000_000)}, "meta": {}}, rank_file(sys.argv[1], 2, 0))
"""


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    good = {"model": {"w": torch.arange(4.0)}, "meta": {"conv": "gc2l"}}
    atomic_save(good, rank_file(tmp_path, 1, 0))
    mark_complete(tmp_path, 1)
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)])
    epoch2 = rank_file(tmp_path, 2, 0).parent
    deadline = time.time() + 60
    while not any(epoch2.glob(".*.tmp*")):                # the write is under way
        assert writer.poll() is None and time.time() < deadline, "the writer never started"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not rank_file(tmp_path, 2, 0).exists()         # never renamed into place
    assert latest_complete_epoch(tmp_path) == 1
    state = load_rank_checkpoint(tmp_path, 1, 0, {"conv": "gc2l"})
    assert torch.equal(state["model"]["w"], good["model"]["w"])


def test_slurm_variables_of_an_srun_task_become_torchruns():
    from twolevel_dist.parallel.mesh import apply_slurm_env, first_host
    env = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    apply_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "8", "1")
    assert env["MASTER_ADDR"] == first_host("gpu[07-08]") == "gpu07"
    assert env["MASTER_PORT"] == str(20000 + 4242)
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "9"}
    apply_slurm_env(torchrun)                         # torchrun's own variables win
    assert (torchrun["RANK"], torchrun["WORLD_SIZE"]) == ("0", "2")
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}
    apply_slurm_env(batch_script)                     # not an srun task: one process
    assert "RANK" not in batch_script
    assert first_host("node[3,5-6],login1") == "node3" and first_host("solo") == "solo"


def test_torchrun_script_refuses_a_world_size_that_groups_does_not_divide(tmp_path):
    out = subprocess.run(["bash", "launch/torchrun.sh", *SMALL, "groups=3",
                          f"run_dir={tmp_path / 'run'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NPROC": "2", "MAX_RESTARTS": "0",
                              "PYTHON": sys.executable})
    assert out.returncode != 0
    assert "groups=3 does not divide the world size 2" in out.stdout + out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
