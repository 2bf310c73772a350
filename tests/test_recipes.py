"""The training recipes beyond plain SGD: the learning-rate schedule (fractions of the epochs,
warmup, the linear scaling rule, rebuilt on resume), label smoothing, gradient clipping by the
global norm and the weight average (EMA), each sharded against the single-device model."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed import run_on_ranks
from omegaconf import OmegaConf
from test_train import SMALL, _train, run_entry_point

from twolevel_dist.config import TrainConfig, validate
from twolevel_dist.engine.ema import ShardEMA
from twolevel_dist.engine.metrics import read_metrics
from twolevel_dist.engine.schedule import LearningRate, milestone_epochs, scaled_lr
from twolevel_dist.errors import ConfigError
from twolevel_dist.models import build_model
from twolevel_dist.parallel import consolidate_state_dict, init_mesh, parallelize
from twolevel_dist.parallel.grad_norm import clip_grad_norm_

# ---------------------------------------------------------------------------------------------
# The schedule


def test_fraction_milestones_are_the_papers_epochs_and_whole_ones_stay():
    assert milestone_epochs([0.3, 0.6, 0.8], 200) == [60, 120, 160]
    assert milestone_epochs([0.3, 0.6, 0.8], 5) == [2, 3, 4]          # half up: 1.5 -> 2
    assert milestone_epochs([60.0, 120.0], 200) == [60, 120]


@pytest.mark.parametrize("name", ["multistep", "cosine"])
def test_the_rate_per_epoch_is_torchs_scheduler_stepped_once_per_epoch(name):
    epochs, steps = 12, 5
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.4)
    torchs = (torch.optim.lr_scheduler.MultiStepLR(optimizer, [3, 7, 7], gamma=0.2)
              if name == "multistep" else
              torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs))
    ours = LearningRate(base=0.4, name=name, epochs=epochs, steps_per_epoch=steps,
                        milestones=(3, 7, 7), gamma=0.2)
    for epoch in range(epochs):
        for step in range(epoch * steps, (epoch + 1) * steps):
            assert ours.at(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        optimizer.step()
        torchs.step()


def test_warmup_ramps_linearly_per_step_then_leaves_the_schedule():
    rate = LearningRate(base=1.0, name="multistep", epochs=4, steps_per_epoch=10,
                        milestones=(2,), gamma=0.1, warmup_steps=4)
    assert [rate.at(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert rate.at(20) == pytest.approx(0.1)
    assert scaled_lr(0.1, 512, 128) == pytest.approx(0.4) and scaled_lr(0.1, 512, None) == 0.1


def _config(**changes) -> TrainConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.from_dotlist(
        [f"{k}={v}" for k, v in changes.items()]))
    return OmegaConf.to_object(cfg)


def test_the_default_milestones_fit_any_number_of_epochs():
    validate(_config(**{"train.epochs": 5}))       # was refused: [60, 120, 160] beyond 5
    validate(_config(**{"train.epochs": 200, "schedule.milestones": "[60,120,160]"}))


@pytest.mark.parametrize("changes,words", [
    ({"schedule.milestones": "[0.5,3]"}, "mixes fractions"),
    ({"schedule.milestones": "[5]", "train.epochs": 5}, "not whole epochs inside [1"),
    ({"schedule.milestones": "[2.5]"}, "not whole epochs"),
    ({"schedule.warmup_epochs": 1, "schedule.warmup_steps": 10}, "give one of them"),
    ({"optim.lr_reference_batch": 0}, "optim.lr_reference_batch=0"),
    ({"optim.label_smoothing": 1.0}, "optim.label_smoothing=1.0 must be in [0, 1)"),
    ({"optim.clip_grad_norm": 0}, "optim.clip_grad_norm=0"),
    ({"train.ema_decay": 1.0}, "train.ema_decay=1.0 must be in (0, 1)"),
])
def test_bad_recipe_settings_are_refused_with_the_fix(changes, words):
    with pytest.raises(ConfigError) as refused:
        validate(_config(**changes))
    assert words in str(refused.value)


def test_a_resume_with_more_epochs_continues_the_new_schedule(tmp_path):
    run_dir = tmp_path / "run"
    common = [*SMALL[:-1], "schedule=cosine", "train.log_every=100"]
    _train(run_dir, *common, "train.epochs=2", nproc=1)
    # Before, T_max = 2 came back from the checkpoint: the third epoch trained at lr 0.
    out = _train(run_dir, *common, "train.epochs=3", "resume=true", nproc=1)
    lrs = [m["lr"] for m in read_metrics(run_dir)]
    # Epochs 1 and 2 as the 2-epoch cosine had them; epoch 3 as the 3-epoch cosine has it.
    assert lrs == pytest.approx([0.1, 0.05, 0.1 * (1 + math.cos(2 * math.pi / 3)) / 2])
    changed = [line for line in (run_dir / "train.log").read_text().splitlines()
               if "the schedule changed" in line]
    assert len(changed) == 1 and "epochs 2 -> 3" in changed[0] and "from step 16" in changed[0]
    assert "error" not in out.stderr.lower()


# ---------------------------------------------------------------------------------------------
# Label smoothing, clipping and the weight average: sharded against one device

MAX_NORM, DECAY, SMOOTHING, STEPS = 0.5, 0.6, 0.1, 3


def _recipe_steps(model, batches, ema, clip):
    """STEPS steps of SGD with label smoothing, clipping and the weight average; the norms."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    norms = []
    for images, labels in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels, label_smoothing=SMOOTHING).backward()
        norms.append(float(clip()))
        optimizer.step()
        ema.update()
    return norms


def _batches(dp, dp_rank):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(STEPS):
        images, labels = torch.randn(8, 3, 16, 16, generator=g), torch.randint(
            0, 10, (8,), generator=g)            # the global batch, over the dp replicas
        out.append((images.chunk(dp)[dp_rank], labels.chunk(dp)[dp_rank]))
    return out


def _sharded(dp, gp):
    """dp > 1: every replica in eval mode (BatchNorm by its running statistics), so that the
    global batch on one device is the same forward as the replicas' halves."""
    torch.set_default_dtype(torch.float64)
    mesh = init_mesh(gp, dp)
    torch.manual_seed(5)
    single = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=1, num_classes=10)
    model = parallelize(copy.deepcopy(single), mesh).train(dp == 1)
    ema = ShardEMA(model, DECAY)
    group = mesh["gp"].get_group() if gp > 1 else None
    norms = _recipe_steps(model, _batches(dp, mesh["dp"].get_local_rank()), ema,
                          lambda: clip_grad_norm_(model, MAX_NORM, group))
    state = consolidate_state_dict(model, mesh)
    with ema.swapped_in():
        averaged = consolidate_state_dict(model, mesh)
    return norms, state, averaged, dist.get_rank()


def _single_device(dp):
    """The reference: one model on the global batch, torch's own clip_grad_norm_, the average
    written out by hand."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(5)
    model = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=1, num_classes=10)
    model.train(dp == 1)
    average = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    norms = []
    for images, labels in _batches(1, 0):
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels, label_smoothing=SMOOTHING).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        optimizer.step()
        for key, value in model.state_dict().items():
            average[key] = (DECAY * average[key] + (1 - DECAY) * value
                            if value.is_floating_point() else value.clone())
    return norms, model.state_dict(), average


@pytest.mark.parametrize("dp,gp", [(1, 2), (2, 1)])
def test_smoothing_clipping_and_the_average_match_one_device(dp, gp):
    results = run_on_ranks(2, _sharded, dp, gp)
    try:
        ref_norms, ref_state, ref_average = _single_device(dp)
    finally:
        torch.set_default_dtype(torch.float32)      # this process runs the other tests
    assert ref_norms[0] > MAX_NORM                       # the clipping did act
    for norms, state, averaged, rank in results:
        assert norms == pytest.approx(ref_norms, rel=1e-7), rank
        for key in ref_state:
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-7, atol=1e-9,
                                       msg=lambda m: f"rank {rank} {key}: {m}")
            torch.testing.assert_close(averaged[key], ref_average[key], rtol=1e-7, atol=1e-9,
                                       msg=lambda m: f"rank {rank} average {key}: {m}")
    # The average is not the live weights (it lags them).
    weight = next(k for k in ref_state if k.endswith("weight"))
    assert not torch.allclose(ref_average[weight], ref_state[weight])


def test_clipping_scales_each_dtype_in_its_own_and_a_model_without_gradients_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    assert float(clip_grad_norm_(model, MAX_NORM)) == 0.0         # before the first backward
    model[1].to(torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    reference = [p.grad.double().clone() for p in model.parameters()]
    expected = torch.nn.utils.get_total_norm(reference)
    norm = clip_grad_norm_(model, MAX_NORM)
    assert float(norm) == pytest.approx(float(expected))
    for p, g in zip(model.parameters(), reference):
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad.double(), g * MAX_NORM / (float(expected) + 1e-6),
                                   rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-6, atol=0)


def test_a_run_with_the_average_writes_and_evaluates_it_each_epoch(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, *SMALL, "train.epochs=2", "groups=2", "train.ema_decay=0.9",
           "optim.clip_grad_norm=1.0", "optim.label_smoothing=0.1",
           "schedule.warmup_epochs=0.5")
    metrics = read_metrics(run_dir)
    assert all(0 <= m["ema_test_acc"] <= 100 for m in metrics)
    saved, averaged = (torch.load(run_dir / name, weights_only=True)
                       for name in ("model.pt", "model_ema.pt"))
    model = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2, dropout=0.0)
    model.load_state_dict(averaged["model"], strict=True)
    assert any(not torch.equal(saved["model"][k], averaged["model"][k]) for k in saved["model"])
    log = (run_dir / "train.log").read_text()
    assert "linear warmup over 4 steps" in log and log.count("EMA test acc") == 2
    # The average evaluated alone: the run's last evaluation of it, from model_ema.pt and, with
    # that moved away, from the last checkpoint's shards.
    for source in ("model_ema.pt", "checkpoint"):
        out = run_entry_point("twolevel_dist.evaluate", run_dir, "weights=ema")
        (line,) = [line for line in out.stdout.splitlines() if line.startswith("evaluated")]
        assert source in line and f"top-1 {metrics[-1]['ema_test_acc']:.2f}%" in line, line
        if source == "model_ema.pt":
            (run_dir / "model_ema.pt").rename(tmp_path / "model_ema.pt")
