"""``twolevel_dist.evaluate`` end to end: a run trained on 2 gloo ranks at gp = 2, evaluated in
one process and under torchrun in both 2-rank layouts, from its model.pt and from its checkpoint
alone, gives the run's own last evaluation; every bad input is one ``error:`` line, exit code 2,
nothing written. Also the ``device`` key, and the console scripts' functions started in a
directory without configs/."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_train import PYTHON, TORCHRUN, run_entry_point

from twolevel_dist import evaluate
from twolevel_dist.config import TrainConfig, validate
from twolevel_dist.engine.checkpoint import latest_complete, rank_file
from twolevel_dist.engine.metrics import read_metrics
from twolevel_dist.errors import ConfigError
from twolevel_dist.models import build_model
from twolevel_dist.parallel import join_shards

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=wrn10_2", "model.widen=1", "dataset.image_size=8", "train.batch_size=32",
        "dataset.train_size=256", "dataset.test_size=100", "tensorboard=false",
        "schedule.milestones=[]"]
LINE = re.compile(r"test loss ([\d.]+) \| top-1 [\d.]+% \((\d+)/(\d+)\) \| top-5 [\d.]+% "
                  r"\((\d+)/\d+\)")
LOSS_TOLERANCE = 1e-5        # relative: float sums in another order (another layout, batch split)


def _run(cmd, cwd, **env):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                               **env})


def _console_script(name: str) -> str:
    """``python -c`` code that does what pyproject's console script ``name`` does."""
    scripts = dict((n, (module, function)) for n, module, function in re.findall(
        r'^(twolevel-\w+) = "([\w.]+):(\w+)"$', (REPO / "pyproject.toml").read_text(), re.M))
    module, function = scripts[name]
    return f"from {module} import {function}; {function}()"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A GC-2L run on 2 gloo ranks, gp = 2, device=cpu, stopped by train.max_steps 5 steps into
    its second epoch: model.pt, and a checkpoint of 2 shards there. Started as twolevel-train
    starts it, in a directory without configs/ (a relative config_path would name a package
    "configs" there)."""
    root = tmp_path_factory.mktemp("evaluate")
    run_dir = root / "run"
    out = _run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--no-python",
                str(PYTHON), "-c", _console_script("twolevel-train"), f"run_dir={run_dir}",
                *TINY, "train.epochs=2", "train.max_steps=13", "groups=2", "device=cpu"], root)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "world=2 (dp=1 x gp=2); device cpu;" in (run_dir / "train.log").read_text()
    assert latest_complete(run_dir).name == "epoch_0001_step_000000013"
    return run_dir


def _files(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _assert_the_runs_last_evaluation(test_loss, correct, images, run_dir):
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 13 and images == 100
    assert correct == round(last["test_acc"] * images / 100)        # the same images right
    assert test_loss == pytest.approx(last["test_loss"], rel=LOSS_TOLERANCE)


def test_model_pt_in_one_process_gives_the_runs_last_evaluation_and_writes_nothing(
        run_dir, capsys):
    before = _files(run_dir.parent)
    evaluate.main([f"run_dir={run_dir}"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"evaluated {run_dir} (model.pt) on the synthetic test set (100 "
                           f"images), dp=1 x gp=1 on cpu: "), line
    loss, correct, images, top5 = LINE.search(line).groups()
    _assert_the_runs_last_evaluation(float(loss), int(correct), int(images), run_dir)
    assert int(correct) <= int(top5) <= 100
    assert _files(run_dir.parent) == before


def test_checkpoint_shards_join_into_the_consolidated_weights(run_dir):
    """The gp = 2 checkpoint's two rank files, joined in one process, are model.pt's tensors
    exactly (what the run's ranks gathered at its end)."""
    position = latest_complete(run_dir)
    shards = [torch.load(rank_file(run_dir, position, g), weights_only=True)["model"]
              for g in (0, 1)]
    with torch.device("meta"):
        template = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=1, dropout=0.0)
    joined = join_shards(shards, template)
    consolidated = torch.load(run_dir / "model.pt", weights_only=True)["model"]
    assert joined.keys() == consolidated.keys()
    for key, tensor in consolidated.items():
        assert torch.equal(joined[key], tensor), key


@pytest.mark.parametrize("gp", [None, 1], ids=["dp1xgp2", "dp2xgp1"])
def test_the_checkpoint_alone_under_torchrun_gives_the_runs_last_evaluation(run_dir, tmp_path,
                                                                              gp):
    """No model.pt: the newest checkpoint (2 shards, where train.max_steps stopped), on 2 gloo
    ranks as gp = 2 (the run's groups, by default; started with python -m) and as 2
    data-parallel replicas of the whole model, each evaluating half the test set (started as
    twolevel-evaluate starts it, in a directory without configs/)."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "model.pt").unlink()
    before = _files(tmp_path)
    if gp is None:
        out = run_entry_point("twolevel_dist.evaluate", copy, nproc=2)
    else:
        out = _run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--no-python",
                    str(PYTHON), "-c", _console_script("twolevel-evaluate"), f"run_dir={copy}",
                    f"gp={gp}"], tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("evaluated")]
    assert (f"(checkpoint epoch_0001_step_000000013, joined from 2 gp shards) on the synthetic "
            f"test set (100 images), dp={2 if gp else 1} x gp={gp or 2} on cpu") in line, line
    loss, correct, images, _ = LINE.search(line).groups()
    _assert_the_runs_last_evaluation(float(loss), int(correct), int(images), run_dir)
    assert _files(tmp_path) == before


def _refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(list(args))
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_every_bad_input_is_one_error_line_and_nothing_written(run_dir, tmp_path, capsys):
    config_only = tmp_path / "config_only"
    shutil.copytree(run_dir / ".hydra", config_only / ".hydra")
    (tmp_path / "empty").mkdir()
    before = _files(tmp_path), _files(run_dir.parent)
    for args, problem in [
            ([], "run_dir=<the directory of a training run> is required"),
            ([f"run_dir={tmp_path / 'none'}"], "no such directory"),
            ([f"run_dir={tmp_path / 'empty'}"], "holds no .hydra/config.yaml"),
            ([f"run_dir={config_only}"], "holds neither model.pt nor a complete checkpoint"),
            ([f"run_dir={run_dir}", "gp=4"], "gp=4 cannot split this run's model (gc2l, 2 "
                                             "groups): gc2l layer 16->16 has groups=2"),
            ([f"run_dir={run_dir}", "gp=3"], "e.g. gp=1 or gp=2"),
            ([f"run_dir={run_dir}", "gp=2"], "gp=2 does not divide the world size 1"),
            ([f"run_dir={run_dir}", "model=wrn10_4"], "unknown config key(s): model; "),
            ([f"run_dri={run_dir}"], "run_dri (did you mean run_dir?)"),
            ([str(run_dir)], f"is not a key=value override; to evaluate the run there, give "
                             f"run_dir={run_dir}"),
            ([f"run_dir={run_dir}", "weight=ema"], "weight (did you mean weights?)"),
            ([f"run_dir={run_dir}", "dataset.num_classes=100"],
             "does not fit this run's model: size mismatch for fc.bias"),
            ([f"run_dir={run_dir}", "dataset=cifar10"], "dataset.name=cifar10"),
            ([f"run_dir={run_dir}", "gp=two"], "could not be converted to Integer"),
            ([f"run_dir={run_dir}", "device=gpu"], "device='gpu' is not one of auto, cpu, "
                                                   "cuda")]:
        assert problem in _refused(capsys, *args), args
    assert (_files(tmp_path), _files(run_dir.parent)) == before


def test_a_refusal_under_torchrun_says_why_once_as_the_root_cause(tmp_path):
    """Every rank meets the error; rank 0 says it (in torchrun's report, in place of a pointer
    to torchrun's documentation), the others leave it to rank 0."""
    out = run_entry_point("twolevel_dist.evaluate", tmp_path / "none", nproc=2, check=False)
    line = f"error: run_dir={tmp_path / 'none'}: no such directory"
    assert out.returncode != 0
    assert (out.stdout + out.stderr).count(line) == 1, out.stderr[-3000:]
    assert f"traceback : {line}" in out.stderr[out.stderr.index("Root Cause"):]


def test_a_rank_that_dies_under_it_ends_the_others_with_one_line_and_exit_3(run_dir, tmp_path):
    """Rank 1 joins the process group and dies (SIGKILL's effect: no goodbye): rank 0's next
    collective fails, and it says so in one line, not a gloo traceback."""
    from distributed import free_port
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "LOCAL_RANK": "0"}
    peer = subprocess.Popen(
        [str(PYTHON), "-c", "import os; from twolevel_dist.parallel import init_distributed; "
                            "init_distributed(60, 60, 'cpu'); os._exit(9)"],
        env={**os.environ, "PYTHONPATH": str(REPO), **env, "RANK": "1"})
    try:
        out = _run([str(PYTHON), "-m", "twolevel_dist.evaluate", f"run_dir={run_dir}", "gp=1"],
                   tmp_path, **env, RANK="0")
    finally:
        peer.wait(timeout=60)
    assert out.returncode == 3, out.stderr[-3000:]
    assert out.stderr.startswith("error: a collective failed on rank 0"), out.stderr[-3000:]
    assert "Evaluate again once it is fixed" in out.stderr
    assert out.stderr.count("\n") == 1 and not out.stdout


def test_train_refuses_eval_only_and_names_the_evaluator():
    with pytest.raises(ConfigError, match="python -m twolevel_dist.evaluate run_dir="):
        validate(TrainConfig(eval_only=True))


def test_train_with_device_cuda_and_no_gpu_is_refused_before_anything_is_written(tmp_path):
    """No GPU visible (CUDA_VISIBLE_DEVICES empty hides any): one line, exit 2, and not even
    the directory Hydra creates for the run is left. (device=cpu: the run every test here
    evaluates.)"""
    out = _run([str(PYTHON), "-m", "twolevel_dist.train", f"run_dir={tmp_path / 'run'}", *TINY,
                "device=cuda"], REPO, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr == ("error: device=cuda but no CUDA device is visible to this process (a "
                          "CPU build of torch, no driver, or CUDA_VISIBLE_DEVICES hides them); "
                          "use device=cpu or device=auto\n")
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_device_other_than_auto_cpu_or_cuda():
    with pytest.raises(ConfigError, match="device='bogus' is not one of auto, cpu, cuda"):
        validate(TrainConfig(device="bogus"))
