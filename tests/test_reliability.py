"""Nothing lost, nothing mixed, nothing hangs: each fault reproduced for real. A diverging
learning rate, two jobs in one directory, a stale lock, damaged checkpoints, a torn metrics line,
a full disk (a tiny tmpfs), a hung rank under torchrun, and strict configuration."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed import run_on_ranks
from test_train import PYTHON, SMALL, TORCHRUN, _train

from twolevel_dist.engine.checkpoint import (
    COMPLETE,
    Position,
    atomic_save,
    complete_checkpoints,
    complete_epochs,
    epoch_dir,
    latest_complete,
    latest_complete_epoch,
    mark_complete,
    rank_file,
)
from twolevel_dist.engine.metrics import read_metrics
from twolevel_dist.errors import ConfigError, RunError
from twolevel_dist.parallel import init_mesh

ONE_EPOCH = [*SMALL, "groups=2", "train.epochs=1"]


def _refused(out, message):
    """Exit code 2 with ``message`` and no traceback; through torchrun, every worker's 2 (the
    launcher itself reports a failed worker as 1)."""
    tracebacks = out.stderr.count("Traceback (most recent call last)")
    if out.args[0] == str(TORCHRUN):      # torchrun's own report is its one traceback
        assert out.returncode == 1 and "exitcode  : 2" in out.stderr, out.stderr[-3000:]
        assert "exitcode  : 1" not in out.stderr, out.stderr[-3000:]
        assert tracebacks == 1 and "ChildFailedError" in out.stderr, out.stderr[-3000:]
    else:
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
        assert tracebacks == 0, out.stderr[-3000:]
    assert message in out.stderr, out.stderr[-3000:]


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# --- 1. divergence -------------------------------------------------------------------------------

def test_a_diverging_run_stops_with_exit_2_and_writes_nothing_non_finite(tmp_path):
    run_dir = tmp_path / "run"
    out = _train(run_dir, *SMALL, "groups=2", "train.epochs=2", "optim.lr=1e6", check=False)
    _refused(out, "training diverged")
    assert latest_complete_epoch(run_dir) is None          # no checkpoint marked complete
    assert not (run_dir / "model.pt").exists()
    for path in (run_dir / "checkpoints").glob("*/*.pt"):  # nothing non-finite on disk either
        state = torch.load(path, weights_only=True)["model"]
        assert all(t.isfinite().all() for t in state.values() if t.is_floating_point())
    if (run_dir / "metrics.jsonl").exists():
        _strict_json_lines(run_dir / "metrics.jsonl")


def _diverging_batches(bad_step):
    torch.manual_seed(0)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(8)]
    batches[bad_step - 1][0][0, 0] = float("nan")
    return batches


@pytest.mark.parametrize("lag", [0, 2])
def test_the_divergence_guard_catches_the_step_and_before_any_checkpoint(monkeypatch, lag):
    # On GPUs each step's flag is read two steps later (no host sync per step): lag=2 here is
    # that code on the CPU. The run stops at the step that diverged, naming it; a checkpoint
    # asked for in between (on_step asks for the epoch's sums first) reads every flag, so it is
    # refused before anything is saved.
    from functools import partial

    from twolevel_dist.engine import loop
    from twolevel_dist.engine.step_flags import StepFlags
    monkeypatch.setattr(loop, "StepFlags", partial(StepFlags, lag=lag))
    for checkpoint_at in (None, 4):
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stepped, saved = [], []

        def on_step(step, sums, checkpoint_at=checkpoint_at):
            stepped.append(step)
            if step == checkpoint_at:
                saved.append(sums())
        with pytest.raises(RunError, match="not finite at step 4"):
            loop.train_one_epoch(model, _diverging_batches(4), optimizer, device=torch.device(
                "cpu"), amp=False, log_every=0, on_step=on_step)
        assert saved == []
        # Read at once (CPUs), no step is taken with it; read later, the lag's steps are.
        last = 3 if lag == 0 else (4 if checkpoint_at else 4 + lag - 1)
        assert stepped[-1] == last
        assert model.weight.isfinite().all() == (lag == 0)


def test_metrics_stay_strict_json_and_a_torn_last_line_is_repaired(tmp_path):
    from twolevel_dist.engine.metrics import MetricsWriter, truncate_metrics
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.epoch(dict(epoch=1, step=8, test_loss=float("nan"), test_acc=float("inf")))
    writer.epoch(dict(epoch=2, step=16, test_loss=0.5, test_acc=80.0))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "step": 2')                   # killed while appending
    assert _strict_json_lines_but_last(tmp_path / "metrics.jsonl")[0]["test_loss"] is None
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2]
    truncate_metrics(tmp_path, 2)
    assert [r["epoch"] for r in _strict_json_lines(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from twolevel_dist.engine.metrics import MetricsWriter
    first = MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    for step in range(1, 11):                  # a run that got to step 10, its checkpoint at 6
        first.scalars("train", dict(loss=100.0 + step), step)
    first.close()
    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=True, purge_step=7)
    for step in range(7, 13):
        resumed.scalars("train", dict(loss=200.0 + step), step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(s, 100.0 + s) for s in range(1, 7)] + [(s, 200.0 + s) for s in range(7, 13)]


def test_a_run_dir_without_file_locks_is_refused_and_left_as_it_was(tmp_path, monkeypatch):
    import errno
    import fcntl

    from twolevel_dist.engine.run_dir import RunDirLock

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match=r"cannot lock .*\.lock \(Function not implemented\): the "
                                       r"file system of run_dir does not support file locks"):
        RunDirLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()


def _strict_json_lines_but_last(path):
    lines = path.read_text().splitlines()[:-1]
    return [json.loads(line) for line in lines]


# --- 2. run directories --------------------------------------------------------------------------

def test_a_fresh_run_over_an_old_one_is_refused_and_overwrite_replaces_it(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, *ONE_EPOCH, "train.max_steps=2", nproc=1)
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    model_mtime = (run_dir / "model.pt").stat().st_mtime_ns
    out = _train(run_dir, *ONE_EPOCH, "train.max_steps=1", nproc=1, check=False)
    _refused(out, "already holds a run")
    assert "resume=true" in out.stderr and "overwrite=true" in out.stderr
    out = _train(run_dir, *ONE_EPOCH, "groups=0", nproc=1, check=False)   # a bad value
    assert out.returncode == 2
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config   # untouched
    assert (run_dir / "model.pt").stat().st_mtime_ns == model_mtime
    # A replacement refused after its claim (here: init_from names no file) gives the old run
    # back whole, its log included.
    log_text = (run_dir / "train.log").read_text()
    listing = sorted(p.name for p in run_dir.iterdir())
    out = _train(run_dir, *ONE_EPOCH, "overwrite=true", f"init_from={tmp_path}/none.pt",
                 nproc=1, check=False)
    _refused(out, "none.pt")
    assert (run_dir / "model.pt").stat().st_mtime_ns == model_mtime
    assert [m["step"] for m in read_metrics(run_dir)] == [2]
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config
    assert (run_dir / "train.log").read_text() == log_text
    assert sorted(p.name for p in run_dir.iterdir()) == listing
    _train(run_dir, *ONE_EPOCH, "train.max_steps=1", "overwrite=true", nproc=1)
    assert [m["step"] for m in read_metrics(run_dir)] == [1]            # only the new run
    assert "max_steps: 1" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert not (run_dir / ".replaced").exists()


def test_a_replacement_killed_before_its_first_step_gives_the_old_run_back(tmp_path):
    from dataclasses import replace

    from twolevel_dist.config import TrainConfig
    from twolevel_dist.engine.run_dir import claim
    from twolevel_dist.errors import ConfigError
    from twolevel_dist.train import _resolve_resume
    (tmp_path / "checkpoints" / "epoch_0001").mkdir(parents=True)
    mark_complete(tmp_path, 1)
    (tmp_path / "model.pt").write_bytes(b"the old run's model")
    (tmp_path / "train.log").write_text("the old run's log\n")
    lock = claim(tmp_path, continuing=False, overwrite=True)       # the old run set aside
    assert not (tmp_path / "model.pt").exists()
    (tmp_path / "train.log").write_text("the replacement's log\n")
    os.close(lock._fd)              # killed: no take_back, no began; the kernel drops the flock
    with pytest.raises(ConfigError, match="already holds a run"):
        claim(tmp_path, continuing=False, overwrite=False)
    # resume=auto resumes the old run; the replacement requeued (overwrite=true) starts again.
    auto = TrainConfig(resume="auto")
    assert _resolve_resume(auto, tmp_path).resume is True
    again = _resolve_resume(replace(auto, overwrite=True), tmp_path)
    assert again.resume is False and again.overwrite is True
    lock = claim(tmp_path, continuing=True, overwrite=False)       # resume=true: it is back
    assert "restored the run" in lock.restored_note
    assert (tmp_path / "model.pt").read_bytes() == b"the old run's model"
    assert (tmp_path / "train.log").read_text() == "the old run's log\n"
    assert not (tmp_path / ".replaced").exists()
    lock.release()
    lock = claim(tmp_path, continuing=False, overwrite=True)
    lock.began()                   # training began: the old run is gone for good
    lock.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_second_job_in_a_busy_directory_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        [str(PYTHON), "-m", "twolevel_dist.train", f"run_dir={run_dir}", *SMALL,
         "dataset.train_size=4096", "train.epochs=1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run_dir / "train.log").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()
        second = _train(run_dir, *ONE_EPOCH, nproc=1, check=False)
        _refused(second, f"is in use by pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    # The holder is gone (killed): its lock is stale, and the next job takes it over.
    third = _train(run_dir, *ONE_EPOCH, "train.max_steps=1", "overwrite=true", nproc=1)
    assert "took over the stale lock" in third.stdout + (run_dir / "train.log").read_text()
    assert f"pid {first.pid}" in (run_dir / "train.log").read_text()


def test_rejected_commands_leave_nothing_behind(tmp_path):
    for override, message in [("+train.epoch=3", "unknown config key(s): train.epoch (did you "
                                                 "mean train.epochs?)"),
                              ("schedule.gamma=-1", "schedule.gamma=-1.0 must be in (0, 1]"),
                              ("conv=gc2", "conv=gc2 names no conv config (did you mean "
                                           "conv=gc2l?); the choices are flgc, gc, gc2l, sc, "
                                           "shuffle (configs/conv/)")]:
        out = subprocess.run([str(PYTHON), "-m", "twolevel_dist.train", "model=wrn10_2",
                              "train.epochs=2", override], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        _refused(out, message)
        assert out.stderr.count("\n") == 1              # one line
        assert list(tmp_path.iterdir()) in ([], [tmp_path / "outputs"])
        assert not [p for p in tmp_path.rglob("*") if p.is_file()], list(tmp_path.rglob("*"))


@pytest.mark.parametrize("section,values,message", [
    ("schedule", dict(milestones=[1, 5]), "[5] not whole epochs inside [1, train.epochs=2)"),
    ("schedule", dict(gamma=1.5), "schedule.gamma=1.5 must be in (0, 1]"),
    ("optim", dict(momentum=-0.5), "optim.momentum=-0.5 must be >= 0"),
    ("optim", dict(weight_decay=-1.0), "optim.weight_decay=-1.0 must be >= 0"),
    ("dist", dict(timeout_s=0), "dist.timeout_s=0 must be positive"),
])
def test_out_of_range_values_are_refused_with_the_fix(section, values, message):
    from dataclasses import replace

    from twolevel_dist.config import TrainConfig, TrainLoopConfig, validate
    from twolevel_dist.errors import ConfigError
    cfg = TrainConfig(train=TrainLoopConfig(epochs=2))
    cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_config_group_choices_are_checked_in_sweeps_and_hydras_own_left_to_it():
    from twolevel_dist.config import check_config_choices
    from twolevel_dist.errors import ConfigError
    check_config_choices(["-m", "model=wrn10_2,wrn16_4", "+experiment=cifar_wrn28_10",
                          "hydra/launcher=submitit_slurm", "model.widen=3", "schedule=cosine",
                          "conv=choice(gc,gc2l)"])
    with pytest.raises(ConfigError, match=re.escape("model=wrn16_5 names no model config (did "
                                                    "you mean model=wrn16_4?)")):
        check_config_choices(["-m", "model=wrn10_2,wrn16_5"])
    with pytest.raises(ConfigError, match="dataset=cifar names no dataset config"):
        check_config_choices(["+dataset=cifar"])
    with pytest.raises(ConfigError, match=r"configs folder .* is missing.*pip install -e \."):
        check_config_choices([], config_dir="/nonexistent/configs")


def test_a_model_file_that_holds_no_weights_is_explained_without_torchs_advice(tmp_path):
    from twolevel_dist.engine.model_file import read_model_file
    from twolevel_dist.models import build_model
    model = build_model("wrn", conv="sc", depth=10, widen=1)
    # A state dict alone is taken, with no meta.
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    weights, meta = read_model_file(str(tmp_path / "plain.pt"), "init_from", "")
    assert weights.keys() == model.state_dict().keys() and meta == {}
    torch.save(model, tmp_path / "module.pt")                   # the whole module, pickled
    torch.save({"model": model.state_dict()}, tmp_path / "good.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "text.pt").write_text("hello\n")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    torch.save({"model": [1, 2]}, tmp_path / "list.pt")
    for name, why in [("tensor.pt", "holds Tensor, not weights (a state dict, or model.pt's"),
                      ("list.pt", "holds list, not weights"),
                      ("module.pt", "pickled Python objects (twolevel_dist.models.wrn."
                                    "WideResNet), not only tensors: a whole module saved with "
                                    "torch.save(model)? Save its state_dict instead"),
                      ("torn.pt", "a damaged or truncated torch file"),
                      ("text.pt", "not a file torch.save wrote")]:
        with pytest.raises(ConfigError) as refused:
            read_model_file(str(tmp_path / name), "init_from", "give a model.pt")
        assert why in str(refused.value) and "weights_only" not in str(refused.value), name
        assert "\x1b" not in str(refused.value)


def test_override_keys_and_values_are_checked_against_the_schema_before_hydra():
    from twolevel_dist.config import CompressConfig, TrainConfig, check_overrides
    from twolevel_dist.errors import ConfigError
    check_overrides(["-m", "model=wrn10_2,wrn16_4", "+experiment=cifar_wrn28_10", "groups=2,4",
                     "hydra/launcher=submitit_slurm", "hydra.run.dir=x", "model.widen=3",
                     "schedule.milestones=[3]", "train.amp=null", "resume=auto", "~foo",
                     "dataset.root=${oc.env:HOME}/data", "conv=choice(gc,gc2l)"], TrainConfig)
    for args, message in [
            (["train.max_step=3"], "unknown config key(s): train.max_step (did you mean "
                                   "train.max_steps?)"),
            (["model.dept=10"], "model.dept (did you mean model.depth?)"),
            (["-m", "optim.l=0.1,0.2"], "optim.l (did you mean optim.lr?)"),
            (["train.epochs=abc"], "train.epochs=abc: Value 'abc' of type 'str' could not be "
                                   "converted to Integer"),
            (["groups=2,4"], "groups=2,4 lists several values: add -m to sweep over them"),
            (["schedule.milestones=[3"], "cannot read 'schedule.milestones=[3'")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_overrides(args, TrainConfig)
    with pytest.raises(ConfigError, match=re.escape("sg.scop (did you mean sg.scope?)")):
        check_overrides(["method=sg", "sg.scop=layer"], CompressConfig)


def test_default_run_directories_differ_between_jobs(monkeypatch):
    from twolevel_dist.config import _run_id
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert _run_id().endswith(f"_{os.getpid()}")     # one process: the time and its pid
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "a1b2")
    assert _run_id() == "a1b2"                       # torchrun --standalone: a fresh id per job
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert _run_id() == "4242.3"


# --- 4. damaged checkpoints and a full disk ------------------------------------------------------

def test_resume_falls_back_past_damaged_checkpoints_and_says_so(tmp_path):
    run_dir = tmp_path / "run"
    common = [*SMALL, "groups=2", "train.max_steps=4", "dataset.train_size=64"]
    _train(run_dir, *common, "train.epochs=3")            # 2 steps per epoch: epochs 1, 2
    assert latest_complete_epoch(run_dir) == 2
    # Epoch 2: rank 1's file truncated. A COMPLETE marker for epoch 3 without rank files.
    damaged = rank_file(run_dir, 2, 1)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    epoch_dir(run_dir, 3).mkdir()
    (epoch_dir(run_dir, 3) / COMPLETE).write_text("epoch 3\n")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "st')                         # and a torn metrics line
    # Keeping one checkpoint, through epoch 2 only: had the damaged epoch 3 stayed "complete",
    # pruning would have kept it alone, the new epoch 2 deleted.
    out = _train(run_dir, *common, "train.epochs=3", "train.keep_checkpoints=1", "resume=true")
    log = (run_dir / "train.log").read_text()
    assert "skipped epoch 3" in out.stdout + log and "is missing" in out.stdout + log
    assert "skipped epoch 2" in out.stdout + log and str(damaged) in out.stdout + log
    assert "resumed from" in log and "epoch 1, step 2" in log
    assert complete_checkpoints(run_dir) == [Position(2, 0)]
    aside = epoch_dir(run_dir, 2).with_name(epoch_dir(run_dir, 2).name + ".damaged")
    assert (aside / damaged.name).stat().st_size == 1000
    assert epoch_dir(run_dir, 3).with_name(epoch_dir(run_dir, 3).name + ".damaged").is_dir()
    out = _train(run_dir, *common, "train.epochs=3", "train.max_steps=6", "resume=true")
    assert "epoch 2, step 4" in (run_dir / "train.log").read_text()
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]
    # When no complete checkpoint loads on every rank, the error names each file.
    for position in complete_checkpoints(run_dir):
        rank_file(run_dir, position, 0).write_bytes(b"garbage")
    out = _train(run_dir, *common, "train.epochs=3", "resume=true", check=False)
    _refused(out, "no complete checkpoint")
    assert str(rank_file(run_dir, 3, 0)) in out.stderr and "unreadable" in out.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KB tmpfs (root only): room for a run's logs, not for its checkpoints."""
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_reported_as_such_and_leaves_no_temp_file(tiny_disk):
    with pytest.raises(RunError, match="no space left on the device of"):
        atomic_save({"x": torch.zeros(200_000)}, tiny_disk / "big.pt")    # 800 KB
    assert list(tiny_disk.iterdir()) == []
    atomic_save({"x": torch.zeros(10)}, tiny_disk / "small.pt")          # still room after
    assert torch.load(tiny_disk / "small.pt", weights_only=True)["x"].shape == (10,)


def test_a_run_on_a_full_disk_exits_2_with_the_cause(tiny_disk):
    out = _train(tiny_disk / "run", *SMALL, "groups=2", "train.epochs=1", "model.widen=4",
                 check=False)
    _refused(out, "no space left on the device of")
    assert latest_complete_epoch(tiny_disk / "run") is None
    assert not [p for p in tiny_disk.rglob(".*.tmp*")]


# --- 5. a hung rank ------------------------------------------------------------------------------

def _rank_of(pid: int) -> int | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
    return int(ranks[0]) if ranks else None


def test_a_hung_rank_ends_the_job_within_the_timeout(tmp_path):
    # Not less: it also bounds rank 1's wait while rank 0 prepares the 20,000 images.
    timeout_s = 10
    run_dir = tmp_path / "run"
    job = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "twolevel_dist.train",
         f"run_dir={run_dir}", *SMALL, "groups=2", "dataset.train_size=20000", "train.epochs=1",
         f"dist.timeout_s={timeout_s}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    stopped = waiting = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline and stopped is None:
            time.sleep(0.5)
            assert job.poll() is None, job.communicate()[1][-3000:]
            log = run_dir / "train.log"
            if log.exists() and "parameters; world=2" in log.read_text():
                workers = [int(p) for p in subprocess.run(
                    ["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()]
                ranks = {_rank_of(p): p for p in workers}
                stopped, waiting = ranks.get(1), ranks.get(0)
        assert stopped is not None, "the job never started training"
        time.sleep(1)
        os.kill(stopped, signal.SIGSTOP)                  # rank 1 hangs mid-epoch
        hung_at = time.time()
        while _rank_of(waiting) is not None and time.time() < hung_at + timeout_s + 30:
            time.sleep(0.2)
        rank0_gone = time.time() - hung_at
        # torchrun now sends the stopped rank SIGTERM and waits a fixed 30 s before SIGKILL;
        # letting it run on delivers the SIGTERM at once, sparing the test that grace.
        os.kill(stopped, signal.SIGCONT)
        out, err = job.communicate(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
        if stopped is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
    assert job.returncode != 0
    assert timeout_s - 2 < rank0_gone < timeout_s + 20, rank0_gone   # the timeout, not before
    assert "another rank died or hung" in err, err[-3000:]
    assert latest_complete_epoch(run_dir) is None


def _a_gp_peer_hangs(timeout_s, hang_s):
    """dp 2 x gp 2; rank 1 joins its gp all-reduce only after ``hang_s``: the seconds rank 0,
    its gp peer, waited there, and whether its wait failed."""
    mesh = init_mesh(2, timeout_s=timeout_s)
    group, rank = mesh["gp"].get_group(), dist.get_rank()
    if rank == 1:
        time.sleep(hang_s)
    started, failed = time.monotonic(), False
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError:        # gloo's "Timed out waiting ..." (rank 1's: rank 0 has left)
        failed = True
    return time.monotonic() - started, failed


def test_a_hung_peer_in_a_gp_group_smaller_than_the_world_fails_within_the_timeout():
    # DeviceMesh gives such groups torch's 30 minutes unless init_mesh passes the job's on.
    waited, failed = run_on_ranks(4, _a_gp_peer_hangs, 0.5, 3.0)[0]
    assert failed and waited < 2, (waited, failed)


def test_pruning_keeps_the_newest_complete_checkpoints_and_drops_older_torn_ones(tmp_path):
    from twolevel_dist.engine.checkpoint import prune
    for epoch in (1, 2, 3, 4, 5):
        rank_file(tmp_path, epoch, 0).parent.mkdir(parents=True)
        rank_file(tmp_path, epoch, 0).write_bytes(b"x")
        if epoch != 2:                                  # epoch 2: a write that never finished
            mark_complete(tmp_path, epoch)
    assert prune(tmp_path, None) == [] and complete_epochs(tmp_path) == [5, 4, 3, 1]
    assert [p.epochs for p in prune(tmp_path, 2)] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0004",
                                                                           "epoch_0005"]


# --- stopping by a signal -------------------------------------------------------------------------

SIGNALLED = [*SMALL[:2], "dataset.train_size=640", *SMALL[3:], "train.epochs=2", "groups=2",
             "train.log_every=1"]
TORCHRUN_SH = Path(__file__).resolve().parents[1] / "launch" / "torchrun.sh"


def _as_a_terminal_runs_it():
    """A foreground command's signals: SIGINT not ignored (a test runner started in the
    background of a shell has it ignored, and would pass that on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _launch(run_dir, *overrides):
    """``launch/torchrun.sh`` on 2 CPU ranks in its own process group (as a terminal runs it)."""
    return subprocess.Popen(["bash", str(TORCHRUN_SH), f"run_dir={run_dir}", *overrides],
                            env={**os.environ, "PYTHON": str(PYTHON)}, start_new_session=True,
                            preexec_fn=_as_a_terminal_runs_it,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_at(job, run_dir, step, send):
    """Wait until ``run_dir``'s log shows ``step``, then ``send(job)``; the job's output."""
    started = time.time()
    log = run_dir / "train.log"
    while not (log.is_file() and f" step {step}/" in log.read_text()):
        assert job.poll() is None, job.communicate()
        assert time.time() - started < 180, "the run never reached the step"
        time.sleep(0.1)
    send(job)
    out, err = job.communicate(timeout=180)
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def test_ctrl_c_and_sigterm_stop_at_a_step_with_a_checkpoint_and_resume_auto_loses_nothing(
        tmp_path):
    reference = tmp_path / "reference"
    _train(reference, *SIGNALLED)
    run_dir = tmp_path / "run"
    # Ctrl-C in the middle of epoch 1: the terminal signals the script's process group, which
    # holds neither torchrun nor the ranks (torchrun starts each in a session of its own); the
    # script passes SIGINT on to the ranks. torchrun itself is never signalled: it would kill
    # its ranks 30 s later, whatever they were writing.
    out = _signal_at(_launch(run_dir, *SIGNALLED), run_dir, 10,
                     lambda job: os.killpg(job.pid, signal.SIGINT))
    assert out.returncode == 75, out.stderr[-3000:]
    assert "death signal" not in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "ChildFailedError" not in out.stderr
    stopped = [line for line in out.stderr.splitlines() if line.startswith("stopped: SIGINT")]
    assert len(stopped) == 1 and "resume=auto" in stopped[0], out.stderr[-3000:]
    first = latest_complete(run_dir)
    assert first is not None and first.epochs == 0 and first.step >= 10   # inside epoch 1
    # SIGTERM to the launcher alone (a scheduler stopping the job) in epoch 2 (steps 21-40) of
    # the resumed run.
    out = _signal_at(_launch(run_dir, *SIGNALLED, "resume=auto"), run_dir, 30,
                     lambda job: job.send_signal(signal.SIGTERM))
    assert out.returncode == 75 and "stopped: SIGTERM" in out.stderr, out.stderr[-3000:]
    assert "death signal" not in out.stderr, out.stderr[-3000:]
    assert latest_complete(run_dir).step > first.step
    job = _launch(run_dir, *SIGNALLED, "resume=auto")
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    # The same epochs as the uninterrupted run, to the bit (timings aside).
    assert _outcomes(run_dir) == _outcomes(reference)


def _children(pid):
    return [int(child) for path in Path(f"/proc/{pid}/task").glob("*/children")
            for child in path.read_text().split()]


def test_sigterm_while_the_ranks_still_import_ends_with_130_and_is_not_restarted(tmp_path):
    """A stop request reaching the ranks before they can handle it (they are importing) kills
    them; torchrun restarts them, and the restarted ranks find the request noted and end at
    once, before they claim the run directory."""
    run_dir = tmp_path / "run"
    job = _launch(run_dir, *SIGNALLED)
    started = time.time()
    while not any(_children(torchrun) for torchrun in _children(job.pid)):
        assert job.poll() is None and time.time() - started < 60, job.communicate()
        time.sleep(0.02)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=180)
    assert job.returncode == 130, err[-3000:]
    assert err.splitlines()[-1].startswith("interrupted before the first training step"), err
    assert not run_dir.exists()


def test_a_stop_while_hydra_creates_the_run_directory_leaves_none_behind(tmp_path):
    """A SIGTERM can land after Hydra created the run directory and before train's main runs
    (torchrun.sh's stop, or the agent ending the other ranks after one ended with 130): the
    rank ends as interrupted (130), not killed, and takes the empty directory with it."""
    run_dir = tmp_path / "run"
    script = f"""
import os, signal, sys
import hydra.core.utils
# Hydra's run_job calls configure_log after it creates the run directory, before main.
hydra.core.utils.configure_log = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM)
from twolevel_dist.train import cli
sys.argv = ["train", "run_dir={run_dir}", *{SMALL!r}]
cli()
"""
    out = subprocess.run([str(PYTHON), "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 130, out.stderr[-3000:]
    assert out.stderr.splitlines()[-1].startswith("interrupted before the first training step")
    assert not run_dir.exists()


def test_a_stop_noted_while_the_ranks_set_up_ends_every_rank_before_its_first_step(tmp_path):
    """slurm.sbatch's USR2 reaches ranks that still set up ignored (torchrun runs with it
    ignored); the request noted beside the exit file ends them before training: here rank 0
    alone finds it (after its data loaders), and both ranks end with 130, no step taken, no
    collective failed, and the run directory taken back."""
    run_dir, exit_file = tmp_path / "run", tmp_path / "exit"
    script = tmp_path / "train_with_a_late_stop.py"
    script.write_text(f"""
import sys
import twolevel_dist.train as train
from twolevel_dist.parallel.mesh import env_rank
loaded = []
def loaders_then_a_stop_on_rank_0(*args, **kwargs):
    loaders = original(*args, **kwargs)
    loaded.append(env_rank() == 0)
    return loaders
original, train.loaders_for = train.loaders_for, loaders_then_a_stop_on_rank_0
train.stop_requested_before_start = lambda: any(loaded)
sys.argv = ["train", "run_dir={run_dir}", *{SIGNALLED!r}]
train.cli()
""")
    out = subprocess.run([str(PYTHON), "-m", "twolevel_dist.torchrun", "--standalone",
                          "--nproc_per_node=2", "--max-restarts=1", str(script)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1",
                              "TWOLEVEL_EXIT_FILE": str(exit_file)})
    code, line = exit_file.read_text().split("\n", 1)
    assert code == "130" and line.startswith("interrupted before the first training step"), (
        out.stderr[-3000:])
    assert "collective failed" not in out.stderr and "Traceback" not in out.stderr, (
        out.stderr[-3000:])
    assert not run_dir.exists()


def _outcomes(run_dir):
    keys = ("epoch", "step", "train_loss", "train_acc", "test_loss", "test_acc", "lr")
    return [{k: r[k] for k in keys} for r in read_metrics(run_dir)]


def test_a_refusal_under_the_launcher_is_not_restarted(tmp_path):
    job = _launch(tmp_path / "run", *SIGNALLED, "schedule.gamma=-1")
    out, err = job.communicate(timeout=120)
    assert job.returncode == 2, err[-3000:]
    # Once (rank 0 says it, last, through the script), and no restart round: torchrun alone
    # would run both ranks twice (MAX_RESTARTS=1).
    assert err.count("error: schedule.gamma") == 1, err[-3000:]
    assert err.splitlines()[-1].startswith("error: schedule.gamma"), err[-3000:]
    assert "Traceback" not in err, err[-3000:]      # torchrun's report of it is left out
    assert not (tmp_path / "run").exists()


def test_ctrl_c_at_the_terminal_stops_one_process_with_exit_75_and_no_traceback(tmp_path):
    """A run in a terminal's foreground has Python's Ctrl-C handler (KeyboardInterrupt) when
    the stop handlers replace it; handing the stop over to it after the checkpoint turned exit
    75 into a KeyboardInterrupt traceback and exit 130."""
    run_dir = tmp_path / "run"
    job = subprocess.Popen([str(PYTHON), "-m", "twolevel_dist.train", f"run_dir={run_dir}",
                            *SIGNALLED, "groups=1"], preexec_fn=_as_a_terminal_runs_it,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    out = _signal_at(job, run_dir, 3, lambda job: job.send_signal(signal.SIGINT))
    assert out.returncode == 75, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "KeyboardInterrupt" not in out.stderr
    assert out.stderr.splitlines()[-1].startswith("stopped: SIGINT at step")
    assert latest_complete(run_dir) is not None


def test_sigterm_before_training_ends_as_ctrl_c_does_and_a_python_handler_is_kept():
    """Before training began, a rank signalled by its launcher (launch/torchrun.sh, SLURM)
    ends with KeyboardInterrupt (exit 130, which no launcher restarts), not killed by the
    signal (which torchrun restarts, the stop lost); submitit's handler stays, and is the one
    a stop hands over to."""
    script = """
import os, signal
from twolevel_dist.engine import stop
signal.signal(signal.SIGTERM, signal.SIG_DFL)
stop.interrupt_before_training()
try:
    os.kill(os.getpid(), signal.SIGTERM)
    raise SystemExit("not interrupted")
except KeyboardInterrupt:
    pass
stop.install()
assert not stop.hand_over(signal.SIGTERM) and not stop.hand_over(signal.SIGINT)
submitits = lambda signum, frame: print("handed over", signum, flush=True)
signal.signal(signal.SIGUSR2, submitits)
stop.interrupt_before_training()
assert signal.getsignal(signal.SIGTERM) is stop._handle      # installed: left alone
stop.install()
assert stop.hand_over(signal.SIGUSR2)
"""
    out = subprocess.run([str(PYTHON), "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == f"handed over {int(signal.SIGUSR2)}\n"


def test_a_rank_the_agents_sigterm_interrupts_after_a_refusal_leaves_the_refusal_standing(
        tmp_path, monkeypatch):
    """Rank 0 refuses (2) and ends torchrun's agent, whose SIGTERM reaches rank 1 before its
    training began: rank 1 ends as interrupted (130), but the launcher must see the refusal."""
    from twolevel_dist.engine.ending import report_exit, reported
    monkeypatch.setenv("TWOLEVEL_EXIT_FILE", str(tmp_path / "exit"))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    report_exit(2, "error: schedule.gamma=-1.0 must be in (0, 1]")
    report_exit(130, "interrupted before the first training step")
    report_exit(3, "error: a collective failed on rank 1")
    assert reported() == (2, "error: schedule.gamma=-1.0 must be in (0, 1]")
    report_exit(0, "finished")              # a later round's own end still replaces it
    assert reported() == (0, "finished")


def test_an_interrupted_rank_ends_its_torchrun_agent_so_it_is_not_restarted(tmp_path):
    """Exit 130 (a stop before training began) is, like a refusal (2), never restarted: the
    rank ends its agent (its parent) before exiting."""
    script = """
import os, subprocess, sys, time, signal
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(a[0]))
child = subprocess.run([sys.executable, "-c", "from twolevel_dist.engine.ending import "
                        "report_exit; report_exit(130, 'interrupted')"],
                       env={**os.environ, "TORCHELASTIC_RUN_ID": "x"})
time.sleep(0.2)
print(child.returncode, got, open(os.environ["TWOLEVEL_EXIT_FILE"]).read().split())
"""
    exit_file = tmp_path / "exit"
    out = subprocess.run([str(PYTHON), "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "TWOLEVEL_EXIT_FILE": str(exit_file)})
    assert out.stdout.strip() == f"0 [{int(signal.SIGTERM)}] ['130', 'interrupted']", out.stderr


def test_a_second_stop_signal_ends_at_once_but_a_launchers_echo_does_not():
    script = """
import os, signal, time
from twolevel_dist.engine import stop
stop.install()
os.kill(os.getpid(), signal.SIGTERM)
assert stop.requested() == signal.SIGTERM
os.kill(os.getpid(), signal.SIGTERM)       # within REPEAT_AFTER_S: torchrun passing it on
os.kill(os.getpid(), signal.SIGINT)        # another kind while stopping: ignored
print("still stopping", flush=True)
time.sleep(stop.REPEAT_AFTER_S + 0.2)
os.kill(os.getpid(), signal.SIGTERM)       # pressed again: ends at once
time.sleep(5)
print("not reached", flush=True)
"""
    out = subprocess.run([str(PYTHON), "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGTERM, out.stderr[-2000:]
    assert out.stdout == "still stopping\n"
    assert out.stderr.count("SIGTERM received: stopping after the next step") == 1


def test_only_an_error_every_rank_meets_waits_for_rank_0_to_say_it(tmp_path, monkeypatch):
    from twolevel_dist.engine import ending
    waited = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TWOLEVEL_EXIT_FILE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(ending, "leave_to_rank0", lambda: waited.append(True))
    for own in (False, True):
        with pytest.raises(SystemExit):
            ending.end(2, "error: x", own=own)
    assert waited == [True]          # not for an error of this rank's own (errors.RankError)
    # Where the job's line is already said and final (rank 0's refusal or interruption, which
    # ended torchrun's agent: its SIGTERM interrupts this rank), nothing is waited for or added.
    exit_file = tmp_path / "exit"
    monkeypatch.setenv("TWOLEVEL_EXIT_FILE", str(exit_file))
    for said, code in [(2, 130), (130, 130), (2, 2), (3, 3), (75, 2)]:
        exit_file.write_text(f"{said}\nthe line rank 0 said\n")
        waited.clear()
        with pytest.raises(SystemExit) as ended:
            ending.end(code, "this rank's line")
        assert ended.value.code == code
        assert waited == ([] if said in (2, 130) else [True]), (said, code)
        if not waited:
            assert exit_file.read_text() == f"{said}\nthe line rank 0 said\n"


def test_a_port_rank_0_cannot_bind_ends_every_rank_within_the_startup_timeout(tmp_path):
    # Without torchrun (srun, submitit), rank 0 hosts the rendezvous: here its port is taken.
    # Rank 0 says so, naming the port; rank 1 gives up after dist.startup_timeout_s, not after
    # dist.timeout_s (1800 s).
    # The port is another job's rendezvous store (two jobs that derived the same port).
    import torch.distributed as dist
    from distributed import free_port
    port = free_port()
    other_job = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    try:
        env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "LOCAL_RANK": "0"}
        started = time.time()
        ranks = [subprocess.Popen([str(PYTHON), "-m", "twolevel_dist.train", *SMALL,
                                   f"run_dir={tmp_path / 'run'}", "dist.startup_timeout_s=3"],
                                  env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
        outs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        del other_job
    assert time.time() - started < 90
    assert [rank.returncode for rank in ranks] == [2, 2], outs
    assert f"port {port} on 127.0.0.1 is already in use" in outs[0][1]
    assert f"found no rank 0 of this job at 127.0.0.1:{port} within 3 s" in outs[1][1]
    assert "Traceback" not in outs[0][1] + outs[1][1]
