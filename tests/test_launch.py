"""Launching for real: SLURM (sbatch + torchrun, and Hydra sweeps through submitit), torchrun's
elastic restarts after a killed rank, and checkpoints that survive a kill mid-write."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster, Unavailable
from test_train import SMALL, TORCHRUN, _train

from twolevel_dist.engine.checkpoint import (
    atomic_save,
    complete_epochs,
    latest_complete,
    latest_complete_epoch,
    load_rank_checkpoint,
    mark_complete,
    rank_file,
)
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


# The job the restart tests compare with: GC-2L, N = 2, one rank per group, 3 epochs (dropout on,
# so a restart that replayed the wrong random stream would show).
THREE_EPOCHS = ["model=wrn10_2", "train.batch_size=32", "dataset.train_size=640",
                "dataset.test_size=64", "tensorboard=false", "train.epochs=3", "groups=2",
                "schedule.milestones=[]", "model.dropout=0.2", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The metrics of THREE_EPOCHS run by one torchrun with 2 ranks, nothing killed."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    _train(run_dir, *THREE_EPOCHS)
    assert complete_epochs(run_dir) == [3, 2]            # keep_checkpoints=2: epoch 1 deleted
    return read_metrics(run_dir)


def _environ(pid: int) -> dict:
    try:
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


def _workers(run_dir: Path) -> list[int]:
    """The training processes (torchrun's workers, not its agents) of the job in ``run_dir``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        agent = b"torch.distributed.run" in argv or b"twolevel_dist.torchrun" in argv
        if f"run_dir={run_dir}".encode() in argv and b"twolevel_dist.train" in argv and \
                not agent:
            found.append(int(proc.name))
    return found


def _kill_a_worker_in_epoch_2(jobs: list, run_dir: Path, key: str, value: str) -> None:
    """SIGKILL the one worker whose environment has ``key=value``, well inside epoch 2."""
    deadline = time.time() + 300
    while latest_complete_epoch(run_dir) is None:          # wait for epoch 1's checkpoint
        assert all(j.poll() is None for j in jobs), "the job ended before epoch 1"
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.2)
    time.sleep(1.0)
    victims = [pid for pid in _workers(run_dir) if _environ(pid).get(key) == value]
    assert len(victims) == 1, (victims, _workers(run_dir))
    os.kill(victims[0], signal.SIGKILL)


def _assert_restarted_to_the_same_metrics(run_dir: Path, uninterrupted: list[dict],
                                          resumes: int = 1) -> None:
    assert (run_dir / "train.log").read_text().count("resumed from") >= resumes
    killed = read_metrics(run_dir)
    assert [m["epoch"] for m in killed] == [1, 2, 3]
    for a, b in zip(uninterrupted, killed):
        for key in ("train_loss", "test_loss", "test_acc", "step"):
            assert a[key] == b[key], (key, a, b)


def _sbatch_on_two_nodes(slurm, tmp_path, *overrides, options=(), env=None):
    """``launch/slurm.sbatch`` with THREE_EPOCHS and ``overrides`` on 2 nodes, one rank each,
    waited for by sbatch (``--wait``), its output in ``tmp_path``/slurm-<job id>.out."""
    return subprocess.Popen(
        ["sbatch", "--wait", "--nodes=2", "--cpus-per-task=1", *options,
         f"--output={tmp_path}/slurm-%j.out", "launch/slurm.sbatch", *THREE_EPOCHS, *overrides],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**slurm, "NPROC_PER_NODE": "1", "PYTHON": sys.executable, "MAX_RESTARTS": "1",
             **(env or {})})


def _sbatch_logs(job, tmp_path, during) -> str:
    """``during()`` while ``job`` (an ``sbatch --wait``) runs, then its end (a kill if
    ``during`` failed); its exit code must be 0. The output of every run of the job."""
    try:
        during()
        output, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert job.returncode == 0, output + logs[-6000:]
    return logs


@pytest.mark.slurm
def test_sbatch_on_two_nodes_restarts_a_rank_killed_on_the_second_node_to_the_same_metrics(
        slurm, uninterrupted, tmp_path):
    """GC-2L with one group per node; the node names resolve nowhere (the rendezvous needs
    SLURM's NodeAddr); a worker SIGKILLed on node2 in epoch 2 restarts both nodes' workers."""
    run_dir = tmp_path / "run"
    job = _sbatch_on_two_nodes(slurm, tmp_path, f"run_dir={run_dir}",
                               env={"RDZV_PORT": str(29500 + os.getpid() % 1000)})
    logs = _sbatch_logs(job, tmp_path, lambda: _kill_a_worker_in_epoch_2(
        [job], run_dir, "SLURMD_NODENAME", "node2"))
    assert "2 node(s) x 1 ranks, rendezvous on node1 (127.0.0.1:" in logs
    assert "world=2 (dp=1 x gp=2)" in (run_dir / "train.log").read_text()
    _assert_restarted_to_the_same_metrics(run_dir, uninterrupted)


@pytest.mark.slurm
def test_hydra_sweep_over_groups_through_the_submitit_launcher(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    out = subprocess.run(
        [sys.executable, "-m", "twolevel_dist.train", "-m", "hydra/launcher=slurm",
         "groups=1,2", "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
         f"hydra.sweep.dir={sweep}",
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
@pytest.mark.slow          # the Hydra sweep test above submits through submitit the same way
def test_an_accuracy_sweep_runs_one_slurm_job_per_cell_through_submitit(slurm, tmp_path):
    """Two cells, one SLURM job each (GC-2L: one task per group, each its own rank)."""
    protocol = tmp_path / "tiny.yaml"
    protocol.write_text(json.dumps({"train": [*SMALL, "dataset.train_size=64", "train.epochs=2"],
                                    "grid": [{"conv": ["sc", "gc2l"], "groups": [2],
                                              "seeds": [0]}]}))

    runs = tmp_path / "runs"
    out = subprocess.run([sys.executable, "benchmarks/accuracy.py", str(protocol), "--runs",
                          str(runs), "--out", str(runs / "acc"), "--launcher", "slurm",
                          "--poll-s", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env=slurm)
    logs = "\n".join(p.read_text() for p in runs.glob(".sweep/submitit/*.err"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:] + logs[-3000:]
    assert out.stdout.count("submitted SLURM job") == 2 and "[2/2 cells done]" in out.stdout
    assert "world=2 (dp=1 x gp=2)" in (runs / "gc2l_N2_s0" / "train.log").read_text()
    assert (runs / "acc.png").is_file()


@pytest.mark.slow          # the sbatch test restarts the same way (two agents, c10d) under SLURM
def test_two_torchrun_agents_meet_by_c10d_and_restart_a_killed_rank_to_the_same_metrics(
        uninterrupted, tmp_path):
    """``torchrun --nnodes=2``: two agents (nodes) of one rank each on this machine, no SLURM;
    the second agent's worker is SIGKILLed in epoch 2 and both agents restart their workers."""
    run_dir, port = tmp_path / "run", str(_free_port())
    agents = [subprocess.Popen(
        [str(TORCHRUN), "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
         f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-agents", "--max-restarts=1",
         "-m", "twolevel_dist.train", f"run_dir={run_dir}", *THREE_EPOCHS],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
        for _ in range(2)]
    try:
        _kill_a_worker_in_epoch_2(agents, run_dir, "GROUP_RANK", "1")     # the second node's
        outputs = [a.communicate(timeout=600)[0] for a in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-5000:] for o in outputs)
    assert "world=2 (dp=1 x gp=2)" in (run_dir / "train.log").read_text()
    _assert_restarted_to_the_same_metrics(run_dir, uninterrupted)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_restarts_over_a_store_shared_between_rounds_on_several_nodes_are_refused(monkeypatch):
    from twolevel_dist.errors import ConfigError
    from twolevel_dist.parallel.mesh import init_distributed
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1", "GROUP_WORLD_SIZE": "2",
                       "TORCHELASTIC_USE_AGENT_STORE": "True",
                       "TORCHELASTIC_MAX_RESTARTS": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        init_distributed()


def _job_id(job) -> str:
    line = job.stdout.readline()               # "Submitted batch job N"
    assert line.startswith("Submitted batch job"), line
    return line.split()[-1]


def _wait_for_checkpoint_after(job, run_dir: Path, step: int) -> None:
    deadline = time.time() + 300
    while True:
        latest = latest_complete(run_dir)
        # 20 steps an epoch; a checkpoint inside one names its global step.
        if latest is not None and (latest.step or latest.epochs * 20) > step:
            return
        assert job.poll() is None, "the job ended early"
        assert time.time() < deadline, f"no checkpoint past step {step} after 300 s"
        time.sleep(0.2)


@pytest.mark.slurm
@pytest.mark.slow          # two requeues, each a pending wait in SLURM: minutes (README, "Tests")
def test_sbatch_stopped_by_its_time_limit_signal_and_by_scancel_requeues_to_the_same_metrics(
        slurm, uninterrupted, tmp_path):
    """The time limit's warning (USR2 to the batch script, as --signal=B:USR2@90 sends it) in
    epoch 1, then `scancel --signal=USR2` (every process of the step) in the requeued job's
    epoch 2: each time every rank checkpoints at a step and the job requeues itself; the third
    run finishes with exactly the metrics of an uninterrupted run."""
    run_dir = tmp_path / "run"
    job = _sbatch_on_two_nodes(slurm, tmp_path, "train.checkpoint_every_steps=5",
                               f"run_dir={run_dir}", options=["--open-mode=append"])
    def stop_twice():
        job_id = _job_id(job)
        _wait_for_checkpoint_after(job, run_dir, 5)                       # in epoch 1
        subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True, env=slurm)
        _wait_for_checkpoint_after(job, run_dir, 25)                      # requeued, epoch 2
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, env=slurm)
    logs = _sbatch_logs(job, tmp_path, stop_twice)
    assert logs.count("stopped resumable: requeueing job") == 2, logs[-6000:]
    log = (run_dir / "train.log").read_text()
    assert log.count("resumed from") == 2
    _assert_restarted_to_the_same_metrics(run_dir, uninterrupted, resumes=2)


@pytest.mark.slurm
@pytest.mark.slow          # a requeue, a pending wait in SLURM: minutes (README, "Tests")
def test_sbatch_stopped_before_its_ranks_train_requeues_and_then_trains_to_the_same_metrics(
        slurm, uninterrupted, tmp_path):
    """The time limit's warning as the job starts, before its ranks could handle it (torchrun,
    and so its ranks, ignore USR2 until training begins): the ranks end before their first
    step (130) and the job requeues itself, as it does after a stop with a checkpoint."""
    run_dir = tmp_path / "run"
    job = _sbatch_on_two_nodes(slurm, tmp_path, f"run_dir={run_dir}",
                               options=["--open-mode=append"])
    def stop_as_it_starts():
        job_id = _job_id(job)
        out_file, deadline = tmp_path / f"slurm-{job_id}.out", time.time() + 300
        while not (out_file.is_file() and f"job {job_id}: " in out_file.read_text()):
            assert job.poll() is None and time.time() < deadline, "the job never started"
            time.sleep(0.05)
        subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], check=True, env=slurm)
    logs = _sbatch_logs(job, tmp_path, stop_as_it_starts)
    assert "interrupted before the first training step" in logs, logs[-6000:]
    assert logs.count("stopped resumable: requeueing job") == 1, logs[-6000:]
    killed = read_metrics(run_dir)
    assert [(m["epoch"], m["test_acc"]) for m in killed] == [
        (m["epoch"], m["test_acc"]) for m in uninterrupted]


@pytest.mark.slurm
@pytest.mark.slow          # a requeue, a pending wait in SLURM: minutes (README, "Tests")
def test_a_submitit_job_stopped_by_its_time_limit_signal_requeues_to_the_same_metrics(
        slurm, uninterrupted, tmp_path):
    """The Hydra submitit launcher asks SLURM for USR2 before the time limit
    (hydra.launcher.signal_delay_s); sent here in epoch 1 to both tasks (2 nodes, one rank
    each): the ranks checkpoint at one step, submitit requeues the job, and the requeued run
    resumes to exactly the uninterrupted run's metrics."""
    sweep = tmp_path / "sweep"
    job = subprocess.Popen(
        [sys.executable, "-m", "twolevel_dist.train", "-m", "hydra/launcher=slurm",
         "hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=1",
         f"hydra.sweep.dir={sweep}", *THREE_EPOCHS, "train.checkpoint_every_steps=5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=slurm)
    try:
        _wait_for_checkpoint_after(job, sweep / "0", 5)
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                                env=slurm, check=True).stdout.split()
        assert len(queued) == 1, queued
        subprocess.run(["scancel", "--signal=USR2", queued[0]], check=True, env=slurm)
        output, _ = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    logs = "\n".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*.err")))
    assert job.returncode == 0, output[-3000:] + logs[-6000:]
    assert "stopped: SIGUSR2 at step" in logs and "DUE TO JOB REQUEUE" in logs, logs[-6000:]
    _assert_restarted_to_the_same_metrics(sweep / "0", uninterrupted)
