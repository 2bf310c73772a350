"""Nothing silent, nothing left: long work says how far it is with true times (decoding a data
set, evaluating, compress's phases), the ETA counts the evaluations, and a refused run leaves
no directory, says why once (under torchrun too) and a finished run leaves no lock."""

import logging
import re
import time
from pathlib import Path

import pytest
import torch
from test_data import make_image_folder, make_tar_gz
from test_train import _train

from twolevel_dist.data import image_folder
from twolevel_dist.data.image_folder import load_image_folder

TINY = ["model=wrn10_2", "model.widen=1", "dataset.image_size=8", "dataset.train_size=64",
        "dataset.test_size=16", "train.batch_size=16", "train.epochs=1", "tensorboard=false",
        "schedule.milestones=[]"]


def _messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


# --- data preparation ----------------------------------------------------------------------------

def test_decoding_reports_progress_and_a_cached_start_says_where_it_read(tmp_path, monkeypatch,
                                                                         caplog):
    root = tmp_path / "set"
    make_image_folder(root, per_class=(4, 2))                # 12 train, 6 test images
    monkeypatch.setattr(image_folder, "_IMAGES_PER_TASK", 4)
    monkeypatch.setattr(image_folder, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level(logging.INFO)
    load_image_folder(root, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").glob("*.npz")
    what = f"decoding 18 images of {root} (12 train, 6 test) into the cache {cache}"
    assert _messages(caplog) == [f"{what} ...", f"{what}: 4/18 images (22%), 0 s",
                                 f"{what}: 8/18 images (44%), 0 s",
                                 f"{what}: 12/18 images (67%), 0 s",
                                 f"{what}: 16/18 images (89%), 0 s",
                                 f"{what}: done in 0 s (0 MB written)"]
    caplog.clear()
    load_image_folder(root, cache_dir=tmp_path / "cache")
    (line,) = _messages(caplog)
    assert line.startswith(f"read 18 decoded images of {root} from the cache {cache} (0 MB) in")


def test_the_cache_moves_with_twolevel_cache_or_dataset_cache_dir(tmp_path, monkeypatch, caplog):
    from twolevel_dist.config import DatasetConfig
    from twolevel_dist.engine.loaders import build_loaders
    root = tmp_path / "set"
    make_image_folder(root)
    monkeypatch.setenv("TWOLEVEL_CACHE", str(tmp_path / "env"))
    caplog.set_level(logging.INFO)
    archive = make_tar_gz(tmp_path / "set.tar.gz", root)
    load_image_folder(archive)
    load_image_folder(archive)
    (extracted,) = (tmp_path / "env" / "extracted").iterdir()
    assert len(list((tmp_path / "env").glob("*.npz"))) == 1
    lines = _messages(caplog)
    assert lines[0] == (f"extracting {archive} into {extracted} (once: later starts reuse it) "
                        f"...") and "done in" in lines[1]
    assert f"{archive}: using its extracted copy {extracted}" in lines
    load_image_folder(root)                                  # a plain folder: there too
    assert len(list((tmp_path / "env").glob("*.npz"))) == 2
    assert not (root / ".twolevel_cache").exists()
    config = DatasetConfig(name="imagefolder", root=str(root), cache_dir=str(tmp_path / "key"))
    build_loaders(config, seed=0, device=torch.device("cpu"), per_replica=2)
    assert len(list((tmp_path / "key").glob("set-*.npz"))) == 1   # the key wins


# --- evaluation ----------------------------------------------------------------------------------

def test_a_long_evaluation_reports_progress_and_a_short_one_is_quiet(monkeypatch, caplog):
    from twolevel_dist.engine import loop
    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    caplog.set_level(logging.INFO)
    loop.evaluate(model, batches, device=torch.device("cpu"), amp=False, dp_group=None)
    assert _messages(caplog) == []                           # under 30 s: nothing
    monkeypatch.setattr(loop, "EVAL_PROGRESS_EVERY_S", 0.0)  # every evaluation "long"
    loop.evaluate(model, batches, device=torch.device("cpu"), amp=False, dp_group=None)
    assert _messages(caplog) == [f"evaluating the test set: {n}/4 batches ({25 * n}%), 0 s"
                                 for n in (1, 2, 3)] + ["evaluating the test set: done in 0 s"]


def test_the_eta_counts_the_evaluations_still_to_come():
    from twolevel_dist.engine.metrics import step_line
    stats = dict(step=35, epoch_step=5, loss=1.0, step_time_s=1.0, data_wait_s=0.0,
                 images_per_s=10.0)
    line = dict(label="epoch 4/10", steps_in_epoch=10, total_steps=100, lr=0.1)
    # 65 steps at 1 s; evaluations after epochs 4 to 10: 7.
    assert step_line(stats, **line).endswith("ETA 0:01:05 + 7 evaluations not yet timed")
    assert step_line(stats, **line, evaluation_s=5.0).endswith("ETA 0:01:40")
    at_the_end = dict(stats, step=100, epoch_step=10)        # its epoch's evaluation still due
    assert step_line(at_the_end, **line).endswith("ETA 0:00:00 + 1 evaluation not yet timed")
    # train.max_steps=95: 60 steps and 7 evaluations (after epochs 4 to 9, then at step 95).
    capped = dict(line, total_steps=95)
    assert step_line(stats, **capped, evaluation_s=5.0).endswith("ETA 0:01:35")


# --- compress ------------------------------------------------------------------------------------

def test_compress_phase_lines_give_their_true_time_evaluation_included(monkeypatch, caplog):
    from twolevel_dist import compress
    from twolevel_dist.config import CompressConfig, DatasetConfig
    from twolevel_dist.engine.loaders import build_loaders
    from twolevel_dist.engine.metrics import MetricsWriter
    from twolevel_dist.models import build_model
    cfg = CompressConfig(dataset=DatasetConfig(train_size=32, test_size=16, image_size=8))
    loaders = build_loaders(cfg.dataset, seed=0, device=torch.device("cpu"), per_replica=16)
    real = compress.evaluate

    def slow_evaluate(*args, **kwargs):                      # an evaluation of 1.5 s
        time.sleep(1.5)
        return real(*args, **kwargs)
    monkeypatch.setattr(compress, "evaluate", slow_evaluate)
    caplog.set_level(logging.INFO)
    finetuner = compress.Finetuner(cfg, *loaders, torch.device("cpu"),
                                   MetricsWriter(".", enabled=False, tensorboard=False))
    model = build_model("wrn", conv="sc", depth=10, widen=1, num_classes=10)
    finetuner(model, 2, "fine-tuning")
    epoch_lines = [m for m in _messages(caplog) if m.startswith("fine-tuning epoch")]
    assert len(epoch_lines) == 2
    assert all(re.search(r"\| \d+ s training \+ [12] s evaluation$", m) for m in epoch_lines)
    (phase,) = [m for m in _messages(caplog) if m.startswith("fine-tuning: ")]
    assert int(re.fullmatch(r"fine-tuning: 2 epochs in (\d+) s", phase).group(1)) >= 3


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,line", [
    (["dataset=imagefolder", "dataset.root=/nonexistent"],
     "error: image folder root /nonexistent does not exist"),
    (["groups=3"], "error: groups=3 does not divide the world size 2"),
    (["resume=true"], "error: resume=true but"),
    # A typo'd key: Hydra alone says it in five lines, on each rank and again in the restart.
    (["train.max_step=3"], "error: unknown config key(s): train.max_step (did you mean "
                           "train.max_steps?)"),
])
def test_a_refusal_under_torchrun_leaves_no_directory_and_says_why_once(tmp_path, overrides,
                                                                         line):
    run_dir = tmp_path / "run"
    out = _train(run_dir, *TINY, *overrides, check=False)
    assert out.returncode != 0
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []
    output = out.stdout + out.stderr
    assert output.count(line) == 1, output[-3000:]
    # In torchrun's report, as the root cause (not a link to torchrun's documentation).
    root_cause = out.stderr[out.stderr.index("Root Cause"):]
    assert f"traceback : {line}" in root_cause, out.stderr[-3000:]


def _files(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*")
            if p.is_file()}


def test_a_refused_resume_leaves_the_run_as_it_was_and_a_finished_run_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, *TINY, nproc=1)
    assert not (run_dir / ".lock").exists()                  # a clean finish lets it go
    finished = _files(run_dir)
    # Refused after its claim (the data are missing): what it wrote is taken back, the earlier
    # run's .hydra config and train.log among it.
    out = _train(run_dir, *TINY, "train.epochs=2", "resume=true", "dataset=imagefolder",
                 f"dataset.root={tmp_path / 'missing'}", nproc=1, check=False)
    assert out.returncode == 2 and out.stderr.count("error: image folder root") == 1
    assert _files(run_dir) == finished
    out = _train(run_dir, *TINY, "train.epochs=2", "resume=true", nproc=1)
    log = (run_dir / "train.log").read_text()
    assert "resumed from" in log and "stale lock" not in out.stdout + log
    assert not (run_dir / ".lock").exists()
