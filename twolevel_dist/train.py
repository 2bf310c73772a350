"""The training entry point (Hydra).

    python -m twolevel_dist.train                                   # one process
    torchrun --standalone --nproc_per_node=2 -m twolevel_dist.train model=wrn16_4 conv=gc2l groups=2

One process runs the single-device model; under torchrun the ranks form a ("dp", "gp") mesh with
gp = groups ranks per model and dp = world // groups replicas, and the model is parallelized.
All ranks share one run directory (named from torchrun's run id, identical on every rank); only
rank 0 writes logs, metrics, TensorBoard and the consolidated model.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from twolevel_dist.config import TrainConfig, register_resolvers, validate
from twolevel_dist.data import DataError
from twolevel_dist.data.seeding import derive_seed
from twolevel_dist.engine.checkpoint import (atomic_save, latest_complete_epoch,
                                             load_rank_checkpoint, mark_complete, rank_file,
                                             read_model_file)
from twolevel_dist.engine.device import configure_backends, resolve_amp, rng_state, set_rng_state
from twolevel_dist.engine.loaders import build_loaders
from twolevel_dist.engine.loop import (Progress, average_batch_norm_statistics, evaluate,
                                       train_one_epoch)
from twolevel_dist.engine.metrics import MetricsWriter, truncate_metrics
from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import to_layout
from twolevel_dist.models import build_model, count_parameters
from twolevel_dist.parallel import (all_reduce_values, consolidate_state_dict, env_rank,
                                    env_world_size, init_distributed, init_mesh, local_device,
                                    parallelize, unwrap)

log = logging.getLogger("twolevel_dist")


register_resolvers()
OmegaConf.register_new_resolver("twolevel_rank_zero_only",
                                lambda value: value if env_rank() == 0 else None, replace=True)
ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _setup_logging(run_dir: Path, rank: int) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers,
                        force=True)


def _layout(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(groups of the model's convolutions, gp ranks per model)."""
    groups = cfg.groups or world
    kind = cfg.conv.kind
    model_groups = 1 if kind == "sc" else groups
    gp = 1 if world == 1 or kind == "flgc" else groups
    if world % gp:
        raise ConfigError(f"groups={groups} does not divide the world size {world}: each model "
                          f"needs {groups} ranks; launch a multiple of {groups} processes")
    return model_groups, gp


def load_consolidated(model: torch.nn.Module, path: str) -> None:
    """Weights from a consolidated single-device ``model.pt`` (a finished run's, or one that
    ``twolevel_dist.compress`` converted), checked against the model this run builds."""
    saved = read_model_file(path, "init_from", "pass a model.pt")
    try:
        model.load_state_dict(saved["model"] if "model" in saved else saved, strict=True)
    except RuntimeError as error:
        meta = saved.get("meta", {})
        raise ConfigError(f"init_from={path} ({meta}) does not fit this run's model: "
                          f"{str(error).splitlines()[-1].strip()}; build the same model, conv "
                          f"and groups") from None
    log.info(f"initialised from {path}")


def run(cfg: TrainConfig, run_dir: Path) -> dict:
    validate(cfg)
    world = env_world_size()
    # Under a launcher the process group exists even for one rank (the same path as many).
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    device = init_distributed(cfg.dist.timeout_s) if launched else local_device()
    configure_backends(device, tf32=cfg.train.tf32)
    amp = resolve_amp(cfg.train.amp, device)
    rank = dist.get_rank() if world > 1 else 0
    model_groups, gp = _layout(cfg, world)
    mesh = init_mesh(gp) if world > 1 else None
    dp_group = mesh["dp"].get_group() if mesh is not None else None
    dp_size = mesh["dp"].size() if mesh is not None else 1
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    if cfg.train.batch_size % dp_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be "
                          f"divisible by the {dp_size} data-parallel replicas")
    _setup_logging(run_dir, rank)
    per_replica = cfg.train.batch_size // dp_size
    train_loader, test_loader = build_loaders(
        cfg.dataset, seed=cfg.seed, device=device, rank=rank, world=world, dp_rank=dp_rank,
        dp_size=dp_size, per_replica=per_replica, channels_last=cfg.train.channels_last)
    num_classes = train_loader.num_classes
    sizes = f"{len(train_loader.labels)} train / {len(test_loader.labels)} test images"

    # Model: the same full network on every rank (same seed), then this rank's shard of it.
    torch.manual_seed(cfg.seed)
    model_kwargs = cfg.model.build_kwargs()
    model = build_model(cfg.model.name, conv=cfg.conv.kind, groups=model_groups,
                        num_classes=num_classes, **model_kwargs)
    if cfg.init_from:
        load_consolidated(model, cfg.init_from)
    total_parameters = count_parameters(model)
    if cfg.train.channels_last:
        to_layout(model, torch.channels_last)
    # Sharded on the CPU, then moved: only this rank's shard ever reaches its GPU.
    if mesh is not None:
        model = parallelize(model, mesh, overlap=cfg.conv.overlap, device=device)
    else:
        model.to(device)
    torch.manual_seed(derive_seed(cfg.seed, "rank", rank))    # dropout masks differ per rank
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
    if cfg.schedule.name == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(cfg.schedule.milestones), gamma=cfg.schedule.gamma)
    step_model = torch.compile(model) if cfg.train.compile else model

    meta = dict(model=cfg.model.name, model_kwargs=repr(sorted(model_kwargs.items())),
                conv=cfg.conv.kind, groups=cfg.groups or world, world=world, gp=gp)
    epochs_done, global_step = 0, 0
    latest = latest_complete_epoch(run_dir)
    # torchrun restarted the workers (--max-restarts) after a failure: continue where it stopped.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    if cfg.resume and latest is None:
        raise ConfigError(f"resume=true but {run_dir}/checkpoints holds no complete "
                          f"checkpoint; start without resume")
    if (cfg.resume or restarted) and latest is not None:
        state = load_rank_checkpoint(run_dir, latest, rank, meta)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], device)
        epochs_done, global_step = state["epochs_done"], state["global_step"]
        if rank == 0:
            truncate_metrics(run_dir, epochs_done)   # drop epochs logged after that checkpoint
        log.info(f"resumed from {rank_file(run_dir, latest, rank).parent} "
                 f"(epoch {epochs_done}, step {global_step})")

    log.info(f"{cfg.model.name} {model_kwargs} conv={cfg.conv.kind} groups={cfg.groups or world}: "
             f"{total_parameters:,} parameters; world={world} (dp={dp_size} x gp={gp}); "
             f"{cfg.dataset.name}: {sizes}; "
             f"run directory {run_dir}")
    if cfg.eval_only:
        test_loss, test_acc = evaluate(step_model, test_loader, device=device, amp=amp,
                                       dp_group=dp_group)
        log.info(f"eval: test loss {test_loss:.4f}, test accuracy {test_acc:.2f}%")
        if world > 1:
            dist.barrier()
        return dict(test_loss=test_loss, test_acc=test_acc)

    writer = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=cfg.tensorboard)
    record = {}
    for epoch in range(epochs_done, cfg.train.epochs):
        remaining = None if cfg.train.max_steps is None else cfg.train.max_steps - global_step
        if remaining is not None and remaining <= 0:
            break
        train_loader.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]

        def log_step(stats, lr=lr):
            if rank == 0:
                writer.scalars("train", dict(loss=stats["loss"], lr=lr,
                                             images_per_s=stats["images_per_s"] * dp_size,
                                             step_time_s=stats["step_time_s"],
                                             comm_bytes_per_step=stats["comm_bytes_per_step"]),
                               stats["step"])

        result = train_one_epoch(step_model, train_loader, optimizer, device=device, amp=amp,
                                 max_steps=remaining, first_step=global_step,
                                 log_every=cfg.train.log_every, on_log=log_step,
                                 progress=Progress(rank == 0, len(train_loader), f"epoch {epoch + 1}"))
        global_step += result.steps
        average_batch_norm_statistics(model, dp_group)
        test_loss, test_acc = evaluate(step_model, test_loader, device=device, amp=amp,
                                       dp_group=dp_group)
        scheduler.step()
        loss_sum, correct, samples = all_reduce_values(
            [result.loss * result.samples, result.accuracy * result.samples, result.samples],
            device=device, group=dp_group).tolist()
        record = dict(epoch=epoch + 1, step=global_step, train_loss=loss_sum / samples,
                      train_acc=correct / samples, test_loss=test_loss, test_acc=test_acc, lr=lr,
                      epoch_time_s=result.seconds,
                      images_per_s=samples / result.seconds,
                      comm_bytes_per_step=result.comm_bytes_per_step)
        writer.epoch(record)
        log.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {global_step}: train loss "
                 f"{record['train_loss']:.4f} acc {record['train_acc']:.2f}% | test loss "
                 f"{test_loss:.4f} acc {test_acc:.2f}% | {record['images_per_s']:,.0f} img/s, "
                 f"{result.seconds:.1f} s")
        _save_checkpoint(run_dir, epoch + 1, rank, world, model, optimizer, scheduler, meta,
                         global_step, device)
    writer.close()

    full_state = consolidate_state_dict(model, mesh) if mesh is not None else model.state_dict()
    if rank == 0:
        atomic_save({"model": {k: v.cpu() for k, v in full_state.items()}, "meta": meta},
                    run_dir / "model.pt")
        log.info(f"final test accuracy {record.get('test_acc', float('nan')):.2f}% "
                 f"(consolidated single-device weights: {run_dir / 'model.pt'})")
    if world > 1:
        dist.barrier()   # rank 0 hosts the rendezvous store: nobody leaves while others use it
    return record


def _save_checkpoint(run_dir, epochs_done, rank, world, model, optimizer, scheduler, meta,
                     global_step, device) -> None:
    """Every rank writes its shard atomically; rank 0 marks the epoch complete only after all
    ranks have written, so a job killed mid-write never leaves a "latest" that cannot load."""
    atomic_save(dict(model=unwrap(model).state_dict(), optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), rng=rng_state(device),
                     epochs_done=epochs_done, global_step=global_step, meta=meta),
                rank_file(run_dir, epochs_done, rank))
    if world > 1:
        dist.barrier()
    if rank == 0:
        mark_complete(run_dir, epochs_done)


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg) -> None:
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN and "TORCHELASTIC_RUN_ID" in os.environ:
            raise ConfigError("Hydra sweeps (-m) must not run inside torchrun: each sweep job "
                              "launches its own ranks (use the submitit launcher, or one "
                              "torchrun per value)")
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        run(OmegaConf.to_object(cfg), run_dir)
    except (ConfigError, DataError) as error:      # a clear message, not a stack trace
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
