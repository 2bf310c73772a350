"""The compression entry point (Hydra): from a trained SC network to a cheaper one, on one device.

    python -m twolevel_dist.compress checkpoint=<run>/model.pt model=wrn10_2 dataset=cifar10 \\
        method=sg
    python -m twolevel_dist.compress checkpoint=<run>/model.pt model=wrn10_2 dataset=cifar10 \\
        method=convert convert.conv=gc2l convert.groups=4

method=sg       SG-CNN (Guo et al. 2020): each layer's filters group themselves by k-means on their
                importance vectors, the least important (group, input channel) connections are
                pruned step by step to each target fraction, with fine-tuning between steps
                (scheme local_global) or only at the targets (scheme global). One model per
                target, evaluated as a masked dense network and in its compact grouped form.
method=convert  SC -> GC or GC-2L with N groups: the channels of every channel space are
                partitioned into N equal groups, by importance ("selfgroup") or contiguously,
                the diagonal blocks become the grouped weights, and the result is fine-tuned.
                The saved model.pt loads into build_model(..., conv, groups) and into
                `twolevel_dist.train` runs of that layout.

The run directory gets report.md and report.json (accuracy, parameters, MACs, compression per
result, and per layer), metrics.jsonl (one line per fine-tuning epoch) and one .pt per result.
Every phase's line gives its wall time, its evaluations included; a long evaluation reports its
progress (``engine.loop.evaluate``).
"""

import copy
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from twolevel_dist.config import (
    CONFIG_DIR,
    CompressConfig,
    check_config_choices,
    check_known_keys,
    check_overrides,
    register_resolvers,
    validate_compress,
)
from twolevel_dist.data import DataError
from twolevel_dist.engine.device import clock, configure_backends, resolve_amp
from twolevel_dist.engine.loaders import build_loaders
from twolevel_dist.engine.loop import evaluate, train_one_epoch
from twolevel_dist.engine.metrics import MetricsWriter, step_line
from twolevel_dist.engine.model_file import read_model_file, write_model_file
from twolevel_dist.engine.run_dir import remove_if_empty
from twolevel_dist.errors import ConfigError, RunError
from twolevel_dist.layers import to_layout
from twolevel_dist.layers.group import StandardConv2d
from twolevel_dist.models import build_model
from twolevel_dist.parallel import local_device
from twolevel_dist.progress import duration
from twolevel_dist.selfgroup.accounting import LayerRow, layer_report, markdown_table, totals
from twolevel_dist.selfgroup.convert import convert_to_grouped, wrn_channel_graph
from twolevel_dist.selfgroup.grouping import progressive_schedule, prune_step
from twolevel_dist.selfgroup.layers import self_group_model, set_mode
from twolevel_dist.selfgroup.partition import check_groups

log = logging.getLogger("twolevel_dist")

register_resolvers()
ConfigStore.instance().store(name="compress_schema", node=CompressConfig)


def load_sc_checkpoint(path: str, cfg: CompressConfig, num_classes: int) -> torch.nn.Module:
    """The SC network of a training run's consolidated ``model.pt``, checked against
    ``cfg.model``."""
    weights, meta = read_model_file(path, "checkpoint", "pass the model.pt a training run "
                                    "wrote (python -m twolevel_dist.train conv=sc groups=1 ...)")
    if meta.get("conv", "sc") != "sc":
        raise ConfigError(f"checkpoint={path} was trained with conv={meta['conv']}; compression "
                          f"starts from a standard-convolution network: train one with conv=sc "
                          f"groups=1")
    if meta.get("model", cfg.model.name) != cfg.model.name:
        raise ConfigError(f"checkpoint={path} holds a {meta['model']!r} network but model.name="
                          f"{cfg.model.name!r}; pass the model config it was trained with")
    model = build_model(cfg.model.name, conv="sc", groups=1, num_classes=num_classes,
                        **cfg.model.build_kwargs())
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
        raise ConfigError(
            f"checkpoint={path} does not fit model={cfg.model.name} {cfg.model.build_kwargs()} "
            f"with {num_classes} classes ({first}); it was trained with "
            f"{meta.get('model_kwargs', 'unknown arguments')}: pass that model config") from None
    return model


class Finetuner:
    """SGD with momentum, the learning rate cosine-annealed to zero over each phase's steps."""

    def __init__(self, cfg: CompressConfig, train_loader, test_loader, device, writer):
        self.cfg, self.device, self.writer = cfg, device, writer
        self.amp = resolve_amp(cfg.finetune.amp, device)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.epochs_done = 0
        self.eval_s = None          # the last evaluation's time: the ETA counts it per epoch

    def evaluate(self, model) -> tuple[float, float]:
        """(test loss, top-1 accuracy)."""
        started = time.perf_counter()
        result = evaluate(model, self.test_loader, device=self.device, amp=self.amp,
                          dp_group=None)[:2]
        self.eval_s = time.perf_counter() - started
        return result

    def __call__(self, model, epochs: int, phase: str) -> None:
        if epochs == 0:
            return
        started = time.perf_counter()
        f = self.cfg.finetune
        steps_per_epoch = len(self.train_loader) if f.max_steps is None else \
            min(f.max_steps, len(self.train_loader))
        total = epochs * steps_per_epoch
        optimizer = torch.optim.SGD(model.parameters(), lr=f.lr, momentum=f.momentum,
                                    weight_decay=f.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
        for epoch in range(epochs):
            self.train_loader.set_epoch(self.epochs_done)
            result = train_one_epoch(model, self.train_loader, optimizer, device=self.device,
                                     amp=self.amp, max_steps=f.max_steps,
                                     first_step=epoch * steps_per_epoch,
                                     on_step=lambda step, sums: schedule.step(),
                                     on_log=lambda stats: log.info(step_line(
                                         stats, label=f"{phase}, epoch {epoch + 1}/{epochs}",
                                         steps_in_epoch=steps_per_epoch, total_steps=total,
                                         lr=optimizer.param_groups[0]["lr"],
                                         evaluation_s=self.eval_s)))
            self.epochs_done += 1
            test_loss, test_acc = self.evaluate(model)
            record = dict(epoch=self.epochs_done, step=self.epochs_done, phase=phase,
                          phase_epoch=epoch + 1, train_loss=result.mean_loss,
                          train_acc=result.accuracy, test_loss=test_loss, test_acc=test_acc,
                          epoch_time_s=result.seconds)
            self.writer.epoch(record)
            log.info(f"{phase} epoch {epoch + 1}/{epochs}: train loss {result.mean_loss:.4f} | "
                     f"test acc {test_acc:.2f}% | {duration(result.seconds)} training + "
                     f"{duration(self.eval_s)} evaluation")
        log.info(f"{phase}: {epochs} epoch{'s' if epochs > 1 else ''} in "
                 f"{duration(time.perf_counter() - started)}")


def _eval_ms_per_batch(model, loader, reps: int = 5) -> float:
    """Median forward time of one test batch, in milliseconds (eval mode, no gradient)."""
    images, _ = next(iter(loader))
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(reps + 1):
            start = clock(images.device)
            model(images)
            if i:                        # the first call warms up
                times.append(clock(images.device) - start)
    return 1000 * statistics.median(times)


def _result_row(label: str, model, finetuner, input_size, **extra) -> dict:
    started = time.perf_counter()
    test_loss, test_acc = finetuner.evaluate(model)
    cost = totals(model, input_size)
    log.info(f"{label}: test acc {test_acc:.2f}%, {cost.kept_params:,} parameters | evaluated "
             f"in {duration(time.perf_counter() - started)}")
    return dict(result=label, test_acc=test_acc, test_loss=test_loss,
                params=cost.kept_params, macs=cost.kept_macs, **extra)


def _with_compression(rows: list[dict]) -> list[dict]:
    base = rows[0]
    for row in rows:
        row["param_compression"] = base["params"] / row["params"]
        row["mac_compression"] = base["macs"] / row["macs"]
    return rows


def run_sg(cfg, model, finetuner, input_size, run_dir, meta) -> tuple[list[dict], dict]:
    s = cfg.sg
    rows = [_result_row("baseline (SC)", model, finetuner, input_size)]
    self_group_model(model, include_linear=s.include_linear)
    targets = sorted(set(round(float(t), 10) for t in s.targets))
    schedule = sorted(set(progressive_schedule(targets[-1], s.step)) | set(targets))
    layers = {}
    for sparsity in schedule:
        started = time.perf_counter()
        summary = prune_step(model, sparsity=sparsity, groups=s.groups, seed=cfg.seed,
                             scope=s.scope, include_shortcuts=s.include_shortcuts,
                             linear_until=s.linear_until)
        pruned_s = time.perf_counter() - started
        _, pruned_acc = finetuner.evaluate(model)
        log.info(f"pruned to {100 * summary.pruned_fraction:.1f}% of the connections (step "
                 f"{sparsity}): test acc {pruned_acc:.2f}% before fine-tuning | "
                 f"{duration(pruned_s)} pruning + {duration(finetuner.eval_s)} evaluation")
        if s.scheme == "local_global":
            finetuner(model, s.local_epochs, f"local fine-tuning at {sparsity}")
        if sparsity not in targets:
            continue
        final = copy.deepcopy(model)
        finetuner(final, s.global_epochs, f"global fine-tuning at {sparsity}")
        started = time.perf_counter()
        masked = _result_row(f"SG {sparsity:.0%} pruned", final, finetuner, input_size,
                             acc_right_after_pruning=pruned_acc,
                             masked_ms_per_batch=_eval_ms_per_batch(final,
                                                                    finetuner.test_loader))
        set_mode(final, "compact")
        masked.update(compact_test_acc=finetuner.evaluate(final)[1],
                      compact_ms_per_batch=_eval_ms_per_batch(final, finetuner.test_loader))
        rows.append(masked)
        layers[masked["result"]] = [asdict(r) for r in layer_report(final, input_size)]
        write_model_file(run_dir / f"sg_{round(100 * sparsity)}.pt", final.state_dict(),
                         dict(meta, conv="sg", sparsity=sparsity, sg=asdict(s)))
        log.info(f"{masked['result']}: compact form test acc {masked['compact_test_acc']:.2f}%; "
                 f"both forms evaluated, timed and saved in "
                 f"{duration(time.perf_counter() - started)}")
    return rows, layers


def run_convert(cfg, model, finetuner, input_size, run_dir, meta) -> tuple[list[dict], dict]:
    c = cfg.convert
    rows = [_result_row("baseline (SC)", model, finetuner, input_size)]
    layers = {}
    for partition in c.partitions:
        started = time.perf_counter()
        grouped, report = convert_to_grouped(
            model, conv=c.conv, groups=c.groups, model_name=cfg.model.name,
            model_kwargs=cfg.model.build_kwargs(), method=partition, seed=cfg.seed)
        log.info(f"{report.summary()} | converted in {duration(time.perf_counter() - started)}")
        label = f"{c.conv} N={c.groups}, {partition} partition"
        _, converted_acc = finetuner.evaluate(grouped)
        log.info(f"{label}: test acc {converted_acc:.2f}% before fine-tuning | evaluated in "
                 f"{duration(finetuner.eval_s)}")
        finetuner(grouped, c.epochs, f"fine-tuning {label}")
        rows.append(_result_row(label, grouped, finetuner, input_size,
                                acc_right_after_conversion=converted_acc,
                                importance_kept=report.kept_fraction))
        layers[label] = [dict(layer=name, importance_kept=kept,
                              contiguous_importance_kept=report.contiguous_by_layer[name])
                         for name, kept in report.kept_by_layer.items()]
        write_model_file(run_dir / f"{c.conv}_N{c.groups}_{partition}.pt", grouped.state_dict(),
                         dict(meta, conv=c.conv, groups=c.groups, partition=partition))
    return rows, layers


def write_report(run_dir: Path, cfg: CompressConfig, rows: list[dict], layers: dict) -> None:
    command = "python -m twolevel_dist.compress " + " ".join(sys.argv[1:])
    (run_dir / "report.json").write_text(json.dumps(
        dict(command=command, config=OmegaConf.to_container(OmegaConf.structured(cfg)),
             results=rows, layers=layers), indent=1))
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        if isinstance(value, float):
            return f"{value:.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
        return "" if value is None else str(value)
    lines = [f"# compress: {cfg.method} on {cfg.model.name} {cfg.model.build_kwargs()}, "
             f"{cfg.dataset.name}", "", f"Command: `{command}`", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    for label, table in layers.items():
        lines += ["", f"## {label}: per layer", ""]
        if table and "dense_params" in table[0]:
            lines.append(markdown_table([LayerRow(**row) for row in table]))
        else:
            lines += ["| layer | importance kept | contiguous split |", "|---|---|---|"]
            lines += [f"| {r['layer']} | {r['importance_kept']:.3f} | "
                      f"{r['contiguous_importance_kept']:.3f} |" for r in table]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")


def _preflight(cfg: CompressConfig, model: torch.nn.Module) -> None:
    """The checks that need the model, made before the run writes anything."""
    if cfg.method == "convert":
        check_groups(wrn_channel_graph(model), cfg.convert.groups)
    else:
        narrowest = min(m.out_channels for m in model.modules()
                        if isinstance(m, StandardConv2d))
        if cfg.sg.groups > narrowest:
            raise ConfigError(f"sg.groups={cfg.sg.groups} exceeds the {narrowest} filters of the "
                              f"narrowest layer; use at most {narrowest} groups")


def run(cfg: CompressConfig, run_dir: Path) -> list[dict]:
    validate_compress(cfg)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        # Its report, metrics and models would mix with this run's.
        raise ConfigError(f"run_dir={run_dir} already holds files ("
                          f"{', '.join(sorted(p.name for p in run_dir.iterdir())[:4])}); choose "
                          f"another run_dir, or remove that one")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)], force=True)
    device = local_device()
    configure_backends(device)
    torch.manual_seed(cfg.seed)
    train_loader, test_loader = build_loaders(
        cfg.dataset, seed=cfg.seed, device=device, per_replica=cfg.finetune.batch_size,
        channels_last=cfg.finetune.channels_last)
    model = load_sc_checkpoint(cfg.checkpoint, cfg, train_loader.num_classes).to(device)
    if cfg.finetune.channels_last:
        to_layout(model, torch.channels_last)
    input_size = tuple(next(iter(test_loader))[0].shape[1:])
    _preflight(cfg, model)
    # Only now, with the inputs known good, does the run leave anything on disk.
    run_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger().addHandler(logging.FileHandler(run_dir / "compress.log"))
    writer = MetricsWriter(run_dir, enabled=True, tensorboard=False)
    finetuner = Finetuner(cfg, train_loader, test_loader, device, writer)
    meta = dict(model=cfg.model.name, model_kwargs=repr(sorted(cfg.model.build_kwargs().items())),
                source=str(cfg.checkpoint))
    method = run_sg if cfg.method == "sg" else run_convert
    rows, layers = method(cfg, model, finetuner, input_size, run_dir, meta)
    rows = _with_compression(rows)
    writer.close()
    write_report(run_dir, cfg, rows, layers)
    for row in rows:
        log.info(f"{row['result']}: test acc {row['test_acc']:.2f}%, {row['params']:,} "
                 f"parameters, {row['macs']:,} MACs per image")
    log.info(f"report: {run_dir / 'report.md'}")
    return rows


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="compress")
def main(cfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        check_known_keys(cfg, CompressConfig)
        run(OmegaConf.to_object(cfg), run_dir)
    except (ConfigError, DataError, RunError) as error:   # a clear message, not a stack trace
        print(f"error: {error}", file=sys.stderr)
        remove_if_empty(run_dir)                   # Hydra made it; leave nothing behind
        sys.exit(2)
    except KeyboardInterrupt:
        remove_if_empty(run_dir)
        kept = (f": {run_dir} keeps what finished (compress.log, metrics.jsonl); start again "
                f"with another run_dir" if run_dir.is_dir() else "")
        print(f"interrupted{kept}", file=sys.stderr)
        sys.exit(130)


def cli() -> None:
    """``python -m twolevel_dist.compress``: the command line's config group choices, keys and
    values checked (one ``error:`` line, exit 2), then Hydra's ``main``."""
    try:
        check_config_choices(sys.argv[1:])
        check_overrides(sys.argv[1:], CompressConfig)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
