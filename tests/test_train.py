"""The training application end to end: torchrun on gloo, data sets, checkpoints, resume."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import write_cifar10

from twolevel_dist.engine.checkpoint import (
    COMPLETE,
    atomic_save,
    epoch_dir,
    latest_complete_epoch,
    mark_complete,
    rank_file,
)
from twolevel_dist.engine.metrics import read_metrics, truncate_metrics
from twolevel_dist.models import build_model

PYTHON = Path(sys.executable)
TORCHRUN = PYTHON.with_name("torchrun")
SHARED_JPEG = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10-jpeg.tar.gz"
# A constant learning rate: the default milestones (epochs 60, 120, 160) lie beyond these runs.
SMALL = ["model=wrn10_2", "train.batch_size=32", "dataset.train_size=256",
         "dataset.test_size=64", "tensorboard=false", "schedule.milestones=[]"]


def run_entry_point(module, run_dir, *overrides, nproc=1, check=True):
    """``python -m module`` (torchrun with ``nproc`` > 1) with Hydra overrides; the result."""
    launcher = ([str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1
                else [str(PYTHON)])
    cmd = launcher + ["-m", module, f"run_dir={run_dir}", *overrides]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _train(run_dir, *overrides, nproc=2, check=True):
    return run_entry_point("twolevel_dist.train", run_dir, *overrides, nproc=nproc, check=check)


TWO_RANKS = [*SMALL, "groups=2", "train.log_every=4"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """TWO_RANKS trained for 2 epochs on dp x gp = 1 x 2 (GC-2L, N = 2), once for this file:
    the tests below read it, or resume copies of it."""
    run_dir = tmp_path_factory.mktemp("two_epochs") / "run"
    _train(run_dir, *TWO_RANKS, "train.epochs=2")
    return run_dir


def test_two_rank_run_on_synthetic_data_writes_metrics_checkpoints_and_model(two_epochs):
    run_dir = two_epochs
    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["step"] for m in metrics] == [8, 16]         # 256 images / batch 32
    for key in ("train_loss", "test_loss", "test_acc", "lr", "epoch_time_s", "images_per_s"):
        assert all(np.isfinite(m[key]) for m in metrics), key
    assert metrics[0]["comm_bytes_per_step"] > 0            # the GC-2L all-gathers were counted
    assert latest_complete_epoch(run_dir) == 2
    assert rank_file(run_dir, 2, 0).is_file() and rank_file(run_dir, 2, 1).is_file()
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    model = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2, dropout=0.0)
    model.load_state_dict(saved["model"], strict=True)
    assert (run_dir / ".hydra" / "config.yaml").is_file()   # written once, by rank 0
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 2/2 step") == 1
    # A line every train.log_every steps, in the log file (SLURM logs are not terminals).
    lines = [line for line in log.splitlines() if " [" in line and "ETA" in line]
    assert [line.split("] step ")[1].split()[0] for line in lines] == ["4/16", "8/16", "12/16",
                                                                      "16/16"]
    assert "epoch 2/2 [4/8] step 12/16 loss" in lines[2] and "data wait" in lines[2]
    assert "test_acc5" not in metrics[0]                     # 10 classes: top-1 only


def _step_losses(log: str) -> dict:
    """{"13/16": "2.1234", ...}: the loss of each step the log has a line for."""
    return {line.split("] step ")[1].split()[0]: line.split(" loss ")[1].split()[0]
            for line in log.splitlines() if "] step " in line}


def test_a_run_resumed_inside_an_epoch_continues_with_the_uninterrupted_losses(tmp_path):
    common = [*SMALL, "train.epochs=2", "groups=2", "model.dropout=0.3", "train.log_every=1",
              "train.checkpoint_every_steps=3", "train.keep_checkpoints=null"]
    full = tmp_path / "full"
    _train(full, *common)
    # Resumed when nothing is left to train, the run reports its last epoch's accuracy again.
    again = tmp_path / "again"
    shutil.copytree(full, again)
    _train(again, *common, "resume=true")
    final = f"final test accuracy {read_metrics(full)[-1]['test_acc']:.2f}%"
    assert final in (full / "train.log").read_text()
    assert (again / "train.log").read_text().count(final) == 2
    # 8 steps per epoch: checkpoints inside epochs at steps 3, 6, 9, 12, 15, and at 8 and 16.
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == [
        "epoch_0000_step_000000003", "epoch_0000_step_000000006", "epoch_0001",
        "epoch_0001_step_000000009", "epoch_0001_step_000000012", "epoch_0001_step_000000015",
        "epoch_0002"]
    # Interrupted during step 13 (as a kill leaves it): the newest complete checkpoint is the
    # one after step 12, 4 steps into epoch 2.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    for name in ("epoch_0001_step_000000015", "epoch_0002"):
        shutil.rmtree(cut / "checkpoints" / name)
    (cut / "model.pt").unlink()
    truncate_metrics(cut, 1)
    (cut / "train.log").write_text("")
    _train(cut, *common, "resume=true")
    log = (cut / "train.log").read_text()
    assert "epoch_0001_step_000000012 (epoch 1, step 12, 4 steps into epoch 2)" in log
    resumed, uninterrupted = _step_losses(log), _step_losses((full / "train.log").read_text())
    assert list(resumed) == ["13/16", "14/16", "15/16", "16/16"]
    assert resumed == {step: uninterrupted[step] for step in resumed}
    # The epoch's sums continued where they stopped: its record is the uninterrupted one.
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "step"):
        assert read_metrics(cut)[-1][key] == read_metrics(full)[-1][key], key


def test_a_run_capped_inside_an_epoch_checkpoints_there_and_a_longer_one_finishes_it(tmp_path):
    """train.max_steps=5 of 8 steps per epoch, on dp x gp = 2 x 1: the run stops with a
    checkpoint at step 5, not an end-of-epoch one, and resuming without the cap finishes the
    epoch from step 6 with the uninterrupted run's losses; the epoch's record counts both
    replicas' steps before the cap once each."""
    common = [*SMALL, "train.epochs=1", "groups=1", "model.dropout=0.3", "train.log_every=1"]
    full, capped = tmp_path / "full", tmp_path / "capped"
    _train(full, *common)
    _train(capped, *common, "train.max_steps=5")
    assert [p.name for p in (capped / "checkpoints").iterdir()] == ["epoch_0000_step_000000005"]
    assert read_metrics(capped)[-1]["step"] == 5
    _train(capped, *common, "resume=true")
    log = (capped / "train.log").read_text()
    assert "epoch_0000_step_000000005 (epoch 0, step 5, 5 steps into epoch 1)" in log
    def by_step(log):               # "5/5" in the capped run is "5/8" in the others
        return {step.split("/")[0]: loss for step, loss in _step_losses(log).items()}
    uninterrupted = by_step((full / "train.log").read_text())
    assert by_step(log) == uninterrupted and len(uninterrupted) == 8
    (before, after) = read_metrics(full), read_metrics(capped)
    assert len(after) == 1 and after[0]["step"] == 8
    assert after[0]["train_acc"] == before[0]["train_acc"]
    # Float sums in another order (the replicas' losses and BN statistics were added at the cap).
    for key in ("train_loss", "test_loss"):
        assert after[0][key] == pytest.approx(before[0][key], rel=1e-6), key


def _same_weights(a: Path, b: Path) -> None:
    first, second = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_a_checkpoint_resumes_on_fewer_or_more_data_parallel_replicas(two_epochs, tmp_path):
    """dp x gp = 1 x 2 -> 2 x 2 -> 1 x 2: epoch 3 trained on 2 x 2 from the 1 x 2 checkpoint,
    one checkpoint file per gp rank, which 1 x 2 loads to the same weights (a run resumed with
    its epochs all done only loads and writes model.pt)."""
    wide, back = tmp_path / "wide", tmp_path / "back"
    shutil.copytree(two_epochs, wide)
    out = _train(wide, *TWO_RANKS, "train.epochs=3", "resume=true", nproc=4)   # on 2 x 2
    log = (wide / "train.log").read_text()
    assert "world=4 (dp=2 x gp=2)" in log and "resumed from" in log
    assert [m["epoch"] for m in read_metrics(wide)] == [1, 2, 3]
    # DDP takes the engine's gradients as they are and its options as this torch names them:
    # neither its stride warning nor a deprecation warning, on any rank.
    assert "Warning" not in out.stderr, out.stderr[-3000:]
    assert sorted(p.name for p in epoch_dir(wide, 3).iterdir()) == [
        "COMPLETE", "rank00000.pt", "rank00001.pt"]                      # replica 0 writes
    shutil.copytree(wide, back)
    (back / "model.pt").unlink()
    _train(back, *TWO_RANKS, "train.epochs=3", "resume=true")
    _same_weights(wide / "model.pt", back / "model.pt")


def test_a_checkpoint_for_another_conv_or_group_count_is_refused(two_epochs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(two_epochs, run_dir)
    # One process each (the single-device model, gp = 1, which the checkpoint does not fit
    # either): the message names every difference.
    for override, difference in [("conv=gc", "conv: checkpoint has 'gc2l', this run has 'gc'"),
                                 ("model.widen=4", "model_kwargs: checkpoint has")]:
        out = _train(run_dir, *SMALL, "groups=2", "resume=true", override, nproc=1,
                     check=False)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "does not fit this run" in out.stderr and difference in out.stderr
    out = _train(run_dir, *SMALL, "groups=1", "resume=true", nproc=1, check=False)
    assert out.returncode != 0 and "error:" in out.stderr and "Traceback" not in out.stderr


def test_two_rank_run_on_a_tiny_cifar_pickle_set(tmp_path):
    write_cifar10(tmp_path / "data", per_batch=20)    # the official pickle layout
    run_dir = tmp_path / "run"
    _train(run_dir, "model=wrn10_2", "dataset=cifar10", f"dataset.root={tmp_path / 'data'}",
           "train.batch_size=20", "train.epochs=1", "groups=2", "tensorboard=false",
           "schedule.milestones=[]")
    (record,) = read_metrics(run_dir)
    assert record["step"] == 5                               # 100 images / batch 20


def test_bad_configuration_fails_early_with_a_clear_message(tmp_path):
    for override, message in [("conv.kind=gc3", "is not a convolution kind"),
                              ("train.batch_size=0", "must be at least 1"),
                              ("resume=true", "no complete checkpoint"),
                              ("dataset.train_size=16", "more than the 16 training images: an "
                                                        "epoch would have no full batch; lower "
                                                        "the batch size (train.batch_size")]:
        out = _train(tmp_path / "bad", *SMALL, override, nproc=1, check=False)
        assert out.returncode != 0
        assert message in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_interrupted_checkpoint_is_never_latest(tmp_path):
    atomic_save({"x": torch.ones(1)}, rank_file(tmp_path, 1, 0))
    mark_complete(tmp_path, 1)
    atomic_save({"x": torch.ones(1)}, rank_file(tmp_path, 2, 0))   # no COMPLETE: killed mid-way
    assert latest_complete_epoch(tmp_path) == 1
    assert (rank_file(tmp_path, 1, 0).parent / COMPLETE).is_file()


@pytest.mark.slow          # its evaluation of the 10,000 test images: 20 s (README, "Tests")
@pytest.mark.skipif(not SHARED_JPEG.is_file(),
                    reason=f"the CIFAR-10 JPEG archive is not at {SHARED_JPEG}")
def test_imagefolder_run_on_the_real_cifar10_jpeg_set(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "model=wrn10_2", "dataset=imagefolder", f"dataset.root={SHARED_JPEG}",
           "dataset.train_images=640", "train.batch_size=64", "train.max_steps=3", "groups=2",
           "tensorboard=false")
    (record,) = read_metrics(run_dir)
    assert record["step"] == 3
    log = (run_dir / "train.log").read_text()
    # 64 of each class's 5,000 training images (the sweep's subset); the whole test set.
    assert "imagefolder: 640 train / 10000 test images" in log


def test_streaming_imagenet_layout_trains_through_dataloader_workers(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for cls in ("n01", "n02"):
            folder = tmp_path / "imagenet" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", format="JPEG")
    run_dir = tmp_path / "run"
    _train(run_dir, "model=wrn10_2", "dataset=imagenet", f"dataset.root={tmp_path / 'imagenet'}",
           "dataset.image_size=32", "dataset.workers=1", "train.batch_size=4", "train.epochs=1",
           "schedule.milestones=[]", "tensorboard=false", nproc=1)
    (record,) = read_metrics(run_dir)
    assert record["step"] == 4                        # 16 images / batch 4
    assert "imagenet: 16 train / 8 test images" in (run_dir / "train.log").read_text()


def test_channels_last_training_on_cpu(tmp_path):
    _train(tmp_path / "run", *SMALL, "train.max_steps=2", "train.channels_last=true", "groups=2")
    assert read_metrics(tmp_path / "run")[0]["step"] == 2


def test_tensorboard_scalars_are_written_and_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir = tmp_path / "run"
    _train(run_dir, *[o for o in SMALL if o != "tensorboard=false"], "train.max_steps=3",
           "train.log_every=1", "groups=2")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/step_time_s",
                "train/comm_bytes_per_step", "epoch/test_acc", "epoch/train_loss"):
        assert tag in tags, (tag, tags)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert all(e.value > 0 for e in events.Scalars("train/comm_bytes_per_step"))


@pytest.mark.slow          # 35 s of compilation: run with -m slow (README, "Tests")
def test_torch_compile_on_two_ranks_gives_the_eager_losses(tmp_path):
    common = [*SMALL, "train.max_steps=2", "groups=2"]
    _train(tmp_path / "eager", *common)
    _train(tmp_path / "compiled", *common, "train.compile=true")
    eager, compiled = read_metrics(tmp_path / "eager")[0], read_metrics(tmp_path / "compiled")[0]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-3)
