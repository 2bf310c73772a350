"""The evaluation entry point: a training run's test loss, top-1 and top-5 accuracy, in one line.

    python -m twolevel_dist.evaluate run_dir=outputs/wrn-gc2l/123        # one process: gp=1
    torchrun --standalone --nproc_per_node=2 -m twolevel_dist.evaluate run_dir=...   # gp=groups
    torchrun --standalone --nproc_per_node=2 -m twolevel_dist.evaluate run_dir=... gp=1  # dp=2

It reads the run's own config (run_dir/.hydra/config.yaml) and its weights: the consolidated
model.pt, or where the run has none yet the newest complete checkpoint, whose shards (one file
per gp rank of the run that wrote it) are joined into the single-device weights. Any layout the
model splits into evaluates them: gp ranks per model (default: 1 in one process, else the run's
groups) and dp = world / gp replicas, each on its share of the test set. The numbers of
model.pt, or of a checkpoint the run evaluated (an epoch's end, where train.max_steps stopped),
are that evaluation's in metrics.jsonl to float rounding, on the same device kind (a GPU run
evaluates in bf16 autocast unless train.amp=false).

Keys (Hydra overrides): run_dir (required), gp, device (auto, cpu, cuda, as train's), weights
(model, or ema: the weight average of a run with train.ema_decay, model_ema.pt) and
dataset.* (each one the run's own unless given, e.g. dataset.root=... for the data elsewhere, or
dataset.name=... for another test set of the same classes). It writes nothing. A refusal is one
``error:`` line on stderr and exit code 2; a rank that died or hung under it, one line and
exit code 3 on the others.
"""

import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from twolevel_dist.config import (
    EvaluateConfig,
    TrainConfig,
    check_known_keys,
    validate_evaluate,
)
from twolevel_dist.data import DataError
from twolevel_dist.engine.checkpoint import (
    DamagedCheckpoint,
    epoch_dir,
    latest_complete,
    load_rank_checkpoint,
)
from twolevel_dist.engine.ending import end, peer_failure
from twolevel_dist.engine.loop import evaluate
from twolevel_dist.engine.model_file import read_model_file
from twolevel_dist.errors import ConfigError, RankError, RunError
from twolevel_dist.parallel import env_rank, join_shards, parallelize
from twolevel_dist.parallel.simulated import simulated_mesh
from twolevel_dist.train import (
    build_full_model,
    load_weights,
    loaders_for,
    model_groups,
    place,
    setup_job,
)

ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
KEYS = ("evaluate takes run_dir, gp, device, weights and dataset.*; the run's own config "
        "gives the rest")


def read_config(args: list[str]) -> EvaluateConfig:
    """The command line's ``key=value`` overrides over evaluate's schema, every key checked."""
    keys = {}
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"{arg!r} is not a key=value override; to evaluate the run "
                              f"there, give run_dir={arg}")
        *parents, last = arg.split("=", 1)[0].lstrip("+~").split(".")
        node = keys
        for parent in parents:
            node = node.setdefault(parent, {})
        node[last] = None
    check_known_keys(keys, EvaluateConfig, known=KEYS)
    if "dataset" in keys and keys["dataset"] is None:
        raise ConfigError("dataset=... picks a data set config for train; evaluate starts from "
                          "the run's own: change its keys, e.g. dataset.name=cifar10 "
                          "dataset.root=<folder>")
    try:
        with initialize(version_base="1.3", config_path=None):
            cfg = OmegaConf.to_object(compose(config_name="evaluate_schema", overrides=args))
    except (HydraException, OmegaConfBaseException) as error:
        why = f": {str(error.__cause__).splitlines()[0]}" if error.__cause__ else ""
        raise ConfigError(f"{str(error).splitlines()[0]}{why} ({KEYS})") from None
    validate_evaluate(cfg)
    return cfg


def run_config(cfg: EvaluateConfig) -> TrainConfig:
    """The run's training config, as train recorded it, with evaluate's device and data set
    keys over it."""
    run_dir = Path(cfg.run_dir).expanduser()
    path = run_dir / ".hydra" / "config.yaml"
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir={cfg.run_dir}: no such directory; give a training run's "
                          f"directory (the one its train.log is in)")
    if not path.is_file():
        raise ConfigError(f"run_dir={cfg.run_dir} holds no {path.relative_to(run_dir)}, the "
                          f"config train records there: give the directory of a run that "
                          f"twolevel_dist.train started")
    try:
        saved = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))
        train_cfg = OmegaConf.to_object(saved)
    except Exception as error:        # yaml's or OmegaConf's: a damaged or foreign file
        raise ConfigError(f"{path} is not a training config this version reads "
                          f"({type(error).__name__}: {str(error).splitlines()[0]}); give the "
                          f"directory of a run that twolevel_dist.train started") from None
    given = {key: value for key, value in asdict(cfg.dataset).items() if value is not None}
    return replace(train_cfg, device=cfg.device, dataset=replace(train_cfg.dataset, **given))


def read_weights(run_dir: Path, which: str = "model") -> tuple[list[dict], dict, str]:
    """(the state dicts of the weights' shards, their meta, what they are): the run's model.pt
    (one shard: the single-device weights), else the newest complete checkpoint, one shard per
    gp rank of the run that wrote it. ``which="ema"``: the weight average's, model_ema.pt or
    the checkpoint's average."""
    name, key = ("model.pt", "model") if which == "model" else ("model_ema.pt", "ema")
    if (run_dir / name).is_file():
        weights, meta = read_model_file(run_dir / name, "run_dir", "train writes it at the "
                                        "end of a run: move it away to evaluate the newest "
                                        "checkpoint")
        return [weights], meta, name
    position = latest_complete(run_dir)
    if position is None:
        raise ConfigError(f"run_dir={run_dir} holds neither model.pt nor a complete checkpoint "
                          f"(checkpoints/*/COMPLETE): nothing to evaluate yet; wait for the "
                          f"run's first checkpoint (each epoch, or train.checkpoint_every_steps)")
    try:
        first = load_rank_checkpoint(run_dir, position, 0, {})
        meta = first.get("meta", {})
        states = [first] + [load_rank_checkpoint(run_dir, position, rank, meta)
                            for rank in range(1, meta.get("gp", 1))]
    except DamagedCheckpoint as error:
        raise ConfigError(f"{error}; to evaluate the checkpoint before it, move "
                          f"{epoch_dir(run_dir, position)} out of the run directory") from None
    if states[0].get(key) is None:
        raise ConfigError(f"weights={which}: run_dir={run_dir} kept no weight average (it "
                          f"trained without train.ema_decay); evaluate weights=model")
    return ([state[key] for state in states], meta,
            f"{'the weight average of ' if key == 'ema' else ''}checkpoint {position.name}, "
            f"joined from {len(states)} gp shards")


def check_split(template: torch.nn.Module, gp: int, train_cfg: TrainConfig) -> None:
    """Refuse a gp the model cannot be split into before any rank starts: ``template`` is split
    (in place) as one of gp simulated ranks, with the real split's checks."""
    try:
        parallelize(template, simulated_mesh(gp))
    except ConfigError as error:
        kind, groups = train_cfg.conv.kind, train_cfg.groups
        splits = "gp=1" if kind == "flgc" else f"gp=1 or gp={groups}"
        raise ConfigError(f"gp={gp} cannot split this run's model ({kind}, {groups} groups): "
                          f"{error}. Evaluate it with a gp it splits into, e.g. {splits}") \
            from None


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate the run ``cfg.run_dir`` as this process's place in the job says: the weights
    read and joined, the model built and split as train does it, the test set evaluated.
    Returns the numbers (on every rank)."""
    train_cfg = run_config(cfg)
    shards, meta, source = read_weights(Path(cfg.run_dir).expanduser(), cfg.weights)
    # The run's N, which groups=null (the world size) leaves to its meta.
    train_cfg = replace(train_cfg, groups=meta.get("groups") or train_cfg.groups or len(shards))
    # The run's network with its default head, on the CPU (on meta, its initialisation would
    # import torch._dynamo: seconds): how it splits does not depend on the number of classes.
    template = build_full_model(train_cfg, model_groups(train_cfg, len(shards)), None)
    weights = join_shards(shards, template)
    if cfg.gp is not None:
        check_split(template, cfg.gp, train_cfg)
    del template
    job = setup_job(train_cfg, gp=cfg.gp)
    _, test_loader = loaders_for(train_cfg, job)
    model = build_full_model(train_cfg, job.model_groups, test_loader.num_classes)
    load_weights(model, weights, f"{source} of run_dir={cfg.run_dir}",
                 "a size mismatch of fc alone: evaluate on a test set of the run's classes; "
                 "anything else: the weights are another network's than the one the run's "
                 ".hydra/config.yaml builds (a model.pt copied in from another run?)")
    model = place(train_cfg, job, model)
    loss, top1, top5 = evaluate(model, test_loader, device=job.device, amp=job.amp,
                                dp_group=job.dp_group)
    job.barrier()
    return dict(run_dir=cfg.run_dir, source=source, dataset=train_cfg.dataset.name,
                images=len(test_loader.labels), dp=job.dp_size, gp=job.gp, device=job.device,
                test_loss=loss, test_acc=top1, test_acc5=top5)


def result_line(result: dict) -> str:
    """The one line evaluate prints: what was evaluated, where, and the numbers (accuracies with
    their counts of correct images)."""
    images = result["images"]

    def accuracy(percent):
        return f"{percent:.2f}% ({round(percent * images / 100)}/{images})"
    return (f"evaluated {result['run_dir']} ({result['source']}) on the {result['dataset']} test "
            f"set ({images} images), dp={result['dp']} x gp={result['gp']} on "
            f"{result['device']}: test loss {result['test_loss']:.6f} | top-1 "
            f"{accuracy(result['test_acc'])} | top-5 {accuracy(result['test_acc5'])}")


def main(argv: list[str] | None = None) -> None:
    """``python -m twolevel_dist.evaluate`` and ``twolevel-evaluate``: the result line on rank
    0's stdout, or one ``error:`` line and exit code 2 (3: another rank died)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return
    try:
        result = run(read_config(args))
    except (ConfigError, DataError, RunError) as error:    # a clear message, not a stack trace
        end(2, f"error: {error}", own=isinstance(error, RankError))
    except (dist.DistError, RuntimeError) as error:
        line = peer_failure(error, "Evaluate again once it is fixed")
        if line is None:
            raise
        end(3, line)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if env_rank() == 0:
        print(result_line(result), flush=True)


if __name__ == "__main__":
    main()
