"""The compression entry point end to end: SG-CNN pruning and SC -> GC-2L conversion from a saved
SC model.pt, the files it writes read back, and bad inputs refused before anything is written."""

import json

import pytest
import torch
from test_train import _train, run_entry_point

from twolevel_dist.models import build_model, count_parameters
from twolevel_dist.selfgroup.layers import self_group_model, self_grouped_layers

SMALL = ["model=wrn10_2", "dataset=synthetic", "dataset.train_size=128", "dataset.test_size=64",
         "finetune.batch_size=32", "finetune.max_steps=2"]


def _save_sc(path, conv="sc", groups=1, widen=2):
    torch.manual_seed(0)
    model = build_model("wrn", conv=conv, groups=groups, depth=10, widen=widen, dropout=0.0)
    torch.save({"model": model.state_dict(),
                "meta": dict(model="wrn", conv=conv, groups=groups)}, path)
    return model


def _compress(run_dir, *overrides, check=True):
    return run_entry_point("twolevel_dist.compress", run_dir, *overrides, check=check)


def test_sg_prunes_to_each_target_and_writes_loadable_models_and_a_report(tmp_path):
    _save_sc(tmp_path / "sc.pt")
    run_dir = tmp_path / "sg"
    _compress(run_dir, *SMALL, f"checkpoint={tmp_path / 'sc.pt'}", "method=sg",
              "sg.targets=[0.3,0.6]", "sg.step=0.3", "sg.groups=2", "sg.global_epochs=1")
    report = json.loads((run_dir / "report.json").read_text())
    base, light, heavy = report["results"]
    assert base["result"] == "baseline (SC)" and base["params"] == 303706
    assert base["params"] > light["params"] > heavy["params"]
    assert base["macs"] > light["macs"] > heavy["macs"]
    assert heavy["param_compression"] == pytest.approx(base["params"] / heavy["params"])
    for row in (light, heavy):
        # The compact grouped form computes what the masked dense network computes.
        assert row["compact_test_acc"] == pytest.approx(row["test_acc"], abs=1e-6)
    assert (run_dir / "report.md").read_text().count("| SG ") == 2
    # Each saved model loads strictly into a self-grouped build_model and has the reported size.
    for name, row in (("sg_30.pt", light), ("sg_60.pt", heavy)):
        saved = torch.load(run_dir / name, weights_only=True)
        model = self_group_model(build_model("wrn", conv="sc", depth=10, widen=2, dropout=0.0))
        model.load_state_dict(saved["model"], strict=True)
        assert count_parameters(model) == row["params"]
        assert saved["meta"]["conv"] == "sg"
        masks = [layer.mask for _, layer in self_grouped_layers(model)]
        assert 0 < sum(int(m.sum()) for m in masks) < sum(m.numel() for m in masks)
    # One metrics line per fine-tuning epoch: local after each of the 2 steps, global at each.
    phases = [json.loads(line)["phase"] for line in open(run_dir / "metrics.jsonl")]
    assert phases == ["local fine-tuning at 0.3", "global fine-tuning at 0.3",
                      "local fine-tuning at 0.6", "global fine-tuning at 0.6"]


def test_convert_builds_gc2l_models_that_load_into_build_model(tmp_path):
    _save_sc(tmp_path / "sc.pt")
    run_dir = tmp_path / "convert"
    _compress(run_dir, *SMALL, f"checkpoint={tmp_path / 'sc.pt'}", "method=convert",
              "convert.conv=gc2l", "convert.groups=2", "convert.epochs=1")
    report = json.loads((run_dir / "report.json").read_text())
    base, selfgroup, contiguous = report["results"]
    assert selfgroup["importance_kept"] >= contiguous["importance_kept"]
    reference = build_model("wrn", conv="gc2l", groups=2, depth=10, widen=2, dropout=0.0)
    assert selfgroup["params"] == contiguous["params"] == count_parameters(reference)
    for partition in ("selfgroup", "contiguous"):
        saved = torch.load(run_dir / f"gc2l_N2_{partition}.pt", weights_only=True)
        reference.load_state_dict(saved["model"], strict=True)
        assert saved["meta"]["partition"] == partition
    # Distributed fine-tuning starts from it: 2 ranks, one group each, a learning rate so small
    # that the consolidated result must still be the converted weights.
    converted = run_dir / "gc2l_N2_selfgroup.pt"
    _train(tmp_path / "train", "model=wrn10_2", "conv=gc2l", "groups=2", "train.epochs=1",
           "schedule.milestones=[]",
           "train.max_steps=1", "train.batch_size=32", "dataset.train_size=64",
           "dataset.test_size=32", "tensorboard=false", "optim.lr=1e-12",
           "optim.weight_decay=0", f"init_from={converted}")
    trained = torch.load(tmp_path / "train" / "model.pt", weights_only=True)["model"]
    for key, value in torch.load(converted, weights_only=True)["model"].items():
        if not key.endswith("num_batches_tracked") and "running" not in key:
            torch.testing.assert_close(trained[key], value, rtol=1e-6, atol=1e-7)
    out = _train(tmp_path / "bad", "model=wrn10_2", "conv=gc2l", "groups=4", "train.epochs=1",
                 "schedule.milestones=[]", f"init_from={converted}", nproc=1, check=False)
    assert out.returncode == 2 and "does not fit this run's model" in out.stderr


@pytest.mark.parametrize("overrides,message", [
    (["method=sg"], "checkpoint=<model.pt> is required"),
    (["method=prune", "checkpoint=x.pt"], "method='prune' is not one of"),
    (["checkpoint=missing.pt"], "no such file"),
    (["checkpoint={gc}"], "was trained with conv=gc"),
    (["checkpoint={sc}", "model.widen=4"], "does not fit model=wrn"),
    (["checkpoint={sc}", "sg.targets=[0.5,1.2]"], "strictly between 0 and 1"),
    (["checkpoint={sc}", "method=convert", "convert.conv=shuffle"], "targets gc or gc2l"),
    (["checkpoint={sc}", "method=convert", "convert.groups=3"], "3"),
    (["checkpoint={sc}", "sg.scope=layers"], "sg.scope='layers' is not one of"),
    (["checkpoint={sc}", "sg.step=0"], "sg.step=0.0 must be a pruned fraction"),
    (["checkpoint={sc}", "sg.scop=layer"], "sg.scop (did you mean sg.scope?)"),
])
def test_bad_inputs_fail_early_with_a_clear_message_and_write_nothing(tmp_path, overrides,
                                                                      message):
    _save_sc(tmp_path / "sc.pt")
    _save_sc(tmp_path / "gc.pt", conv="gc", groups=2)
    overrides = [o.format(sc=tmp_path / "sc.pt", gc=tmp_path / "gc.pt") for o in overrides]
    run_dir = tmp_path / "run"
    out = _compress(run_dir, *SMALL, *overrides, check=False)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith("error: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not run_dir.exists()


def test_a_run_dir_that_holds_files_is_refused_and_left_as_it_was(tmp_path):
    """A second compress into one folder would append to its metrics and log and leave the
    first run's models beside a report that lists only its own."""
    _save_sc(tmp_path / "sc.pt")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"phase": "earlier"}\n')
    out = _compress(run_dir, *SMALL, f"checkpoint={tmp_path / 'sc.pt'}", check=False)
    assert out.returncode == 2 and out.stderr.startswith(
        f"error: run_dir={run_dir} already holds files (metrics.jsonl)"), out.stderr
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"phase": "earlier"}\n'


def test_sg_global_only_scheme_fine_tunes_only_at_the_target(tmp_path):
    _save_sc(tmp_path / "sc.pt")
    run_dir = tmp_path / "sg"
    _compress(run_dir, *SMALL, f"checkpoint={tmp_path / 'sc.pt'}", "method=sg",
              "sg.scheme=global", "sg.targets=[0.5]", "sg.step=0.25", "sg.global_epochs=1",
              "sg.scope=layer")
    phases = [json.loads(line)["phase"] for line in open(run_dir / "metrics.jsonl")]
    assert phases == ["global fine-tuning at 0.5"]          # no local fine-tuning after 0.25
    saved = torch.load(run_dir / "sg_50.pt", weights_only=True)
    model = self_group_model(build_model("wrn", conv="sc", depth=10, widen=2, dropout=0.0))
    model.load_state_dict(saved["model"], strict=True)
    # scope=layer: every block convolution that takes part is pruned to about half.
    for name, layer in self_grouped_layers(model):
        if name.endswith(("conv1", "conv2")):
            assert 0.4 <= float(layer.mask.float().mean()) <= 0.6, name
