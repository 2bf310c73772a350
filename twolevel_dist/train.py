"""The training entry point (Hydra).

    python -m twolevel_dist.train                                   # one process
    torchrun --standalone --nproc_per_node=2 -m twolevel_dist.train model=wrn16_4 conv=gc2l groups=2

One process runs the single-device model; under torchrun the ranks form a ("dp", "gp") mesh with
gp = groups ranks per model and dp = world // groups replicas, and the model is parallelized.
All ranks share one run directory (named from the job's id, identical on every rank), which the
job locks for its lifetime (``engine.run_dir``); only rank 0 writes logs, metrics, TensorBoard and
the consolidated model. Every refusal is one ``error:`` line and exit code 2; a peer rank that
died or hung past ``dist.timeout_s`` ends the others with exit code 3.
"""

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from twolevel_dist.config import (
    CONFIG_DIR,
    TrainConfig,
    check_config_choices,
    check_known_keys,
    check_overrides,
    register_resolvers,
    resolved_run_dir,
    validate,
)
from twolevel_dist.data import DataError
from twolevel_dist.data.seeding import derive_seed
from twolevel_dist.engine import stop
from twolevel_dist.engine.checkpoint import (
    Position,
    atomic_save,
    epoch_dir,
    latest_complete,
    load_newest_readable,
    mark_complete,
    prune,
    rank_file,
)
from twolevel_dist.engine.device import configure_backends, resolve_amp, rng_state, set_rng_state
from twolevel_dist.engine.ema import ShardEMA
from twolevel_dist.engine.ending import (
    end,
    peer_failure,
    report_exit,
    stop_requested_before_start,
    stopped_earlier,
)
from twolevel_dist.engine.loaders import build_loaders
from twolevel_dist.engine.loop import (
    EpochSums,
    StopAtStep,
    average_batch_norm_statistics,
    evaluate,
    train_one_epoch,
)
from twolevel_dist.engine.metrics import (
    MetricsWriter,
    read_metrics,
    step_line,
    truncate_metrics,
)
from twolevel_dist.engine.model_file import read_model_file, write_model_file
from twolevel_dist.engine.run_dir import REPLACED, existing_run, remove_if_empty
from twolevel_dist.engine.run_dir import claim as run_dir_claim
from twolevel_dist.engine.schedule import LearningRate, milestone_epochs, scaled_lr
from twolevel_dist.engine.schedule import changes as schedule_changes
from twolevel_dist.errors import ConfigError, RankError, RunError, RunStopped
from twolevel_dist.layers import to_layout
from twolevel_dist.models import build_model, count_parameters
from twolevel_dist.parallel import (
    all_reduce_values,
    consolidate_state_dict,
    env_rank,
    env_world_size,
    init_distributed,
    init_mesh,
    local_device,
    parallelize,
    unwrap,
)
from twolevel_dist.parallel.agreement import gather_from_every_rank, raise_first
from twolevel_dist.parallel.compiling import prepare_for_compile
from twolevel_dist.parallel.grad_norm import clip_grad_norm_

log = logging.getLogger("twolevel_dist")
TOP5_CLASSES = 100      # top-5 accuracy is reported for data sets of at least this many classes


register_resolvers()
ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def _setup_logging(run_dir: Path, rank: int) -> None:
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", handlers=handlers,
                        force=True)


def _stop_logging_to_file() -> None:
    """Close ``train.log`` (before a refused attempt takes it back)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()


def model_groups(cfg: TrainConfig, world: int) -> int:
    """The number of groups of the model's convolutions: ``groups`` (default: the world size);
    1 for ``sc``, which is split by output channels instead."""
    return 1 if cfg.conv.kind == "sc" else cfg.groups or world


def _layout(cfg: TrainConfig, world: int, gp: int | None = None) -> tuple[int, int]:
    """(groups of the model's convolutions, gp ranks per model): ``gp`` where the evaluator
    chose one, else ``groups`` ranks per model (1 in one process, and for ``flgc``)."""
    groups = cfg.groups or world
    name = f"gp={gp}" if gp is not None else f"groups={groups}"
    if gp is None:
        gp = 1 if world == 1 or cfg.conv.kind == "flgc" else groups
    if world % gp:
        raise ConfigError(f"{name} does not divide the world size {world}: each model needs "
                          f"{gp} ranks; launch a multiple of {gp} processes")
    return model_groups(cfg, world), gp


def load_weights(model: torch.nn.Module, state: dict, source: str, fix: str) -> None:
    """A single-device ``state`` dict into ``model``, every key and shape checked: a mismatch
    is one ConfigError naming ``source`` and ``fix``."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ConfigError(f"{source} does not fit this run's model: "
                          f"{str(error).splitlines()[-1].strip().rstrip('.')}; {fix}") from None


def load_consolidated(model: torch.nn.Module, path: str) -> None:
    """Weights from a consolidated single-device ``model.pt`` (a finished run's, or one that
    ``twolevel_dist.compress`` converted), checked against the model this run builds."""
    weights, meta = read_model_file(path, "init_from", "pass a model.pt")
    load_weights(model, weights, f"init_from={path} ({meta})",
                 "build the same model, conv and groups")
    log.info(f"initialised from {path}")


@dataclass
class Job:
    """Where this process stands: its device and place in the ("dp", "gp") mesh."""

    device: torch.device
    amp: bool
    world: int
    rank: int
    mesh: object            # DeviceMesh, or None for one process
    model_groups: int
    gp: int
    restarted: bool = False  # torchrun restarted the workers of some node (see _setup)

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.mesh is not None else None

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size() if self.mesh is not None else 1

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank() if self.mesh is not None else 0

    @property
    def gp_rank(self) -> int:
        return self.mesh["gp"].get_local_rank() if self.mesh is not None else 0

    def gather_dp(self, value) -> list:
        """``value`` of every dp replica of this gp rank, in dp order."""
        return gather_from_every_rank(value, self.dp_group)

    def agree(self, problem):
        """Every rank's ``problem`` (None: all went well), so that all ranks act alike."""
        return gather_from_every_rank(problem)

    def raise_first(self, problem, error_type) -> None:
        """Raise ``error_type`` on every rank with the first rank's problem, if any rank has one
        (so that no rank goes on to a collective the others never reach)."""
        raise_first(problem, error_type)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def run(cfg: TrainConfig, run_dir: Path, config_files: dict | None = None) -> dict:
    """Train as ``cfg`` says, in ``run_dir``: set up, claim the directory, build, restore, fit,
    finish. ``config_files`` (name -> text) are written under ``run_dir/.hydra`` once the
    directory is claimed. Refused before training began (missing data, no checkpoint to resume,
    a checkpoint of another model...), the attempt takes back what it wrote there
    (``RunDirLock.take_back``): a refused run leaves no directory, an earlier run's files as
    they were."""
    validate(cfg)
    cfg = _resolve_resume(cfg, run_dir)
    job = setup_job(cfg)
    if cfg.train.batch_size % job.dp_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} (the global batch) must be "
                          f"divisible by the {job.dp_size} data-parallel replicas")
    lock = _claim(cfg, run_dir, job, config_files or {})
    began = False
    try:
        _setup_logging(run_dir, job.rank)
        for note in (lock.stale_note, lock.restored_note) if lock is not None else ():
            if note:
                log.info(note)
        train_loader, test_loader = loaders_for(cfg, job)
        model, optimizer, meta, parameters = _build(cfg, job, train_loader.num_classes)
        schedule = _schedule(cfg, len(train_loader))
        ema = ShardEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        progress = _restore(cfg, run_dir, job, model, optimizer, schedule, meta, ema)
        log.info(f"{cfg.model.name} {cfg.model.build_kwargs()} conv={cfg.conv.kind} "
                 f"groups={meta['groups']}: {parameters:,} parameters; "
                 f"world={job.world} (dp={job.dp_size} x gp={job.gp}); device {job.device}; "
                 f"{cfg.dataset.name}: {len(train_loader.labels)} train / "
                 f"{len(test_loader.labels)} test images; run directory {run_dir}")
        log.info(f"schedule: {schedule.summary()}")
        # Compiled: the training step only (one graph, the same shapes every step: the training
        # loader drops its last partial batch). Evaluation runs eager: a graph for eval mode and
        # the test set's partial last batch would be two more compiles for a small share of
        # the time.
        step_model = torch.compile(prepare_for_compile(model)) if cfg.train.compile else model
        # A launcher's stop that came while the ranks set up and that no rank saw as a signal
        # (slurm.sbatch's USR2: torchrun and so its ranks run with it ignored until
        # stop.install) is noted beside the exit file: every rank ends here, before any step.
        job.raise_first("a stop was requested while the ranks set up"
                        if stop_requested_before_start() else None, KeyboardInterrupt)
        began = True            # from here on a failure keeps what the run wrote
        if lock is not None:
            lock.began()        # and the run it replaces (overwrite=true) is gone
        record = _fit(cfg, run_dir, job, model, step_model, optimizer, schedule, ema, meta,
                      (train_loader, test_loader), *progress)
        _finish(run_dir, job, model, ema, meta, record)
        return record
    except BaseException:
        if lock is not None and not began:
            _stop_logging_to_file()
            lock.take_back()
        raise
    finally:
        if lock is not None:
            lock.release()


def _resolve_resume(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """resume=auto (what requeued jobs and scripts use; a requeued SLURM job without a resume
    setting too): resume=true where ``run_dir`` holds a complete checkpoint; else a fresh run,
    replacing what an attempt killed before its first checkpoint left there, but never a
    finished run's model.pt."""
    if cfg.resume is False and int(os.environ.get("SLURM_RESTART_COUNT", 0)) > 0:
        log.info("a requeued SLURM job (SLURM_RESTART_COUNT > 0): resume=auto")
        cfg = replace(cfg, resume="auto")
    if cfg.resume != "auto":
        return cfg
    if latest_complete(run_dir) is not None:
        return replace(cfg, resume=True)
    if cfg.overwrite:       # a requeued overwrite=true job that had not checkpointed: again
        return replace(cfg, resume=False)
    # What an overwrite=true attempt killed before training began set aside is the run here
    # (the claim puts it back).
    aside = run_dir / REPLACED
    if latest_complete(aside) is not None:
        return replace(cfg, resume=True)
    if (run_dir / "model.pt").is_file() or (aside / "model.pt").is_file():
        raise ConfigError(f"resume=auto: {run_dir} holds a finished run (model.pt) and no "
                          f"checkpoint to continue from; choose another run_dir, or "
                          f"overwrite=true to replace it")
    return replace(cfg, resume=False, overwrite=bool(existing_run(run_dir)))


def setup_job(cfg: TrainConfig, gp: int | None = None) -> Job:
    """The device (``cfg.device``: refused before anything else where it is not there), the
    process group (under a launcher, even for one rank: the same path as many) and the mesh,
    of ``gp`` ranks per model where given (the evaluator's choice), else ``_layout``'s."""
    world = env_world_size()
    launched = world > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    device = (init_distributed(cfg.dist.timeout_s, cfg.dist.startup_timeout_s, cfg.device)
              if launched else local_device(cfg.device))
    configure_backends(device, tf32=cfg.train.tf32)
    groups, gp = _layout(cfg, world, gp)
    mesh = init_mesh(gp, timeout_s=cfg.dist.timeout_s) if world > 1 else None
    job = Job(device=device, amp=resolve_amp(cfg.train.amp, device), world=world,
              rank=dist.get_rank() if world > 1 else 0, mesh=mesh, model_groups=groups, gp=gp)
    # Whether this is a restart round: torchrun counts a restart only on the nodes whose own
    # workers failed (the others' were stopped for it), so the nodes compare their counts.
    restarts = job.agree(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
    job.restarted = max(restarts) > 0
    return job


def loaders_for(cfg: TrainConfig, job: Job):
    """The (train, test) loaders of ``cfg.dataset`` for this rank's place in ``job``: the global
    batch ``train.batch_size`` split over the dp replicas."""
    return build_loaders(cfg.dataset, seed=cfg.seed, device=job.device, rank=job.rank,
                         world=job.world, dp_rank=job.dp_rank, dp_size=job.dp_size,
                         per_replica=max(cfg.train.batch_size // job.dp_size, 1),
                         channels_last=cfg.train.channels_last,
                         gp_group=job.mesh["gp"].get_group() if job.gp > 1 else None)


def _claim(cfg: TrainConfig, run_dir: Path, job: Job, config_files: dict):
    """Rank 0 locks ``run_dir`` for this job, refuses a fresh run over an old one (unless
    overwrite=true) and records the config; every rank learns the outcome. Nothing is written
    before every check has passed."""
    continuing = cfg.resume or job.restarted
    lock, problem = None, None
    if job.rank == 0:
        try:
            lock = run_dir_claim(run_dir, continuing=continuing, overwrite=cfg.overwrite)
            for name, text in config_files.items():
                (run_dir / ".hydra").mkdir(exist_ok=True)
                (run_dir / ".hydra" / name).write_text(text)
        except ConfigError as error:
            problem = str(error)
    job.raise_first(problem, ConfigError)
    return lock


def build_full_model(cfg: TrainConfig, groups: int, num_classes: int | None) -> torch.nn.Module:
    """The single-device network of ``cfg.model`` and ``cfg.conv`` with ``groups`` groups, on
    the CPU, the same on every rank (same seed)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.name, conv=cfg.conv.kind, groups=groups,
                       num_classes=num_classes, **cfg.model.build_kwargs())


def place(cfg: TrainConfig, job: Job, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (single-device, on the CPU) made this rank's: in ``train.channels_last``'s
    layout, sharded on the CPU over the job's mesh and then moved, so that only this rank's
    shard ever reaches its GPU (in one process, the whole model moved)."""
    if cfg.train.channels_last:
        to_layout(model, torch.channels_last)
    if job.mesh is None:
        return model.to(job.device)
    return parallelize(model, job.mesh, overlap=cfg.conv.overlap, device=job.device)


def _build(cfg: TrainConfig, job: Job, num_classes: int):
    """The model (``init_from``'s weights where given), placed on this rank, and its optimizer.
    Returns (model, optimizer, meta, the full model's parameter count); ``meta`` is what a
    checkpoint must match to be resumed."""
    model = build_full_model(cfg, job.model_groups, num_classes)
    if cfg.init_from:
        load_consolidated(model, cfg.init_from)
    parameters = count_parameters(model)
    model = place(cfg, job, model)
    torch.manual_seed(derive_seed(cfg.seed, "rank", job.rank))    # dropout masks differ per rank
    # The rate is set before every step (engine.schedule); this one is never used.
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay)
    # What a checkpoint must match to be resumed: not the world size, since the data-parallel
    # replicas hold the same shard and may change in number between runs.
    meta = dict(model=cfg.model.name, model_kwargs=repr(sorted(cfg.model.build_kwargs().items())),
                conv=cfg.conv.kind, groups=cfg.groups or job.world, gp=job.gp)
    return model, optimizer, meta, parameters


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> LearningRate:
    s = cfg.schedule
    warmup = s.warmup_steps or math.floor(s.warmup_epochs * steps_per_epoch + 0.5)
    return LearningRate(
        base=scaled_lr(cfg.optim.lr, cfg.train.batch_size, cfg.optim.lr_reference_batch),
        name=s.name if s.name != "multistep" or s.milestones else "constant",
        epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch,
        milestones=tuple(milestone_epochs(list(s.milestones), cfg.train.epochs))
        if s.name == "multistep" else (),
        gamma=s.gamma, warmup_steps=warmup)


def _restore(cfg, run_dir, job, model, optimizer, schedule, meta, ema):
    """(epochs done, global step, the sums of the epoch in progress or None): from the newest
    checkpoint every rank can read when resuming (resume=true, or torchrun restarting the
    workers after a failure), else (0, 0, None). Any number of dp replicas may resume it."""
    if not (cfg.resume or job.restarted):
        return 0, 0, None
    if job.agree(latest_complete(run_dir))[0] is None:      # rank 0's view, for every rank
        if job.restarted and not cfg.resume:      # the failure came before the first checkpoint
            if job.rank == 0:
                truncate_metrics(run_dir, 0)        # an epoch logged before its checkpoint
            return 0, 0, None
        raise ConfigError(f"resume=true but {run_dir}/checkpoints holds no complete "
                          f"checkpoint; start without resume")
    position, state, notes = load_newest_readable(run_dir, job.gp_rank, meta, job.agree,
                                                  set_aside=job.rank == 0)
    for note in notes:
        log.warning(f"resume: {note}")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    changed = schedule_changes(state.get("schedule"), schedule.describe())
    if changed:
        log.info(f"resume: the schedule changed ({', '.join(changed)}): the new one goes on "
                 f"from step {state['global_step']}, at lr {schedule.at(state['global_step']):g}")
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    elif ema is not None:
        log.info("resume: the checkpoint holds no weight average; train.ema_decay starts one "
                 "from the resumed weights")
    _restore_rng(state["rng"], job, cfg.seed, state["global_step"])
    sums = EpochSums(**state["epoch_sums"]) if state.get("epoch_sums") else None
    if sums and job.dp_rank > 0:        # the totals go on in replica 0's sums
        sums = replace(sums, loss=0.0, correct=0, samples=0)
    if job.rank == 0:
        truncate_metrics(run_dir, state["epochs_done"])   # drop epochs logged after it
    inside = f", {sums.steps} steps into epoch {state['epochs_done'] + 1}" if sums else ""
    log.info(f"resumed from {epoch_dir(run_dir, position)} (epoch {state['epochs_done']}, "
             f"step {state['global_step']}{inside})")
    return state["epochs_done"], state["global_step"], sums


def _last_record(run_dir: Path) -> dict:
    """The last epoch's record in ``metrics.jsonl`` (rank 0 writes it), or {}."""
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    return records[-1] if records else {}


def _restore_rng(saved, job, seed: int, step: int) -> None:
    """This rank's random state (dropout masks): its own dp replica's where the checkpoint has
    one (a list by dp rank; older checkpoints hold one state), a fresh seed for a replica the
    checkpointed run did not have."""
    states = saved if isinstance(saved, list) else [saved]
    if job.dp_rank < len(states):
        set_rng_state(states[job.dp_rank], job.device)
    else:
        torch.manual_seed(derive_seed(seed, "rank", job.rank, "resumed at step", step))


def _fit(cfg, run_dir, job, model, step_model, optimizer, schedule, ema, meta, loaders,
         epochs_done, global_step, sums) -> dict:
    """The epochs: train (checkpointing every ``train.checkpoint_every_steps``), average BN
    statistics over dp, evaluate, log, checkpoint. ``sums``: the epoch a checkpoint interrupted,
    which continues at its next batch."""
    train_loader, test_loader = loaders
    writer = MetricsWriter(run_dir, enabled=job.rank == 0, tensorboard=cfg.tensorboard,
                           purge_step=global_step + 1 if cfg.resume or job.restarted
                           else None)
    total_steps = cfg.train.epochs * len(train_loader)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    every, keep = cfg.train.checkpoint_every_steps, cfg.train.keep_checkpoints
    save = partial(_save_checkpoint, run_dir, job=job, model=model, optimizer=optimizer,
                   schedule=schedule, ema=ema, meta=meta, keep=keep)
    clip = None
    if cfg.optim.clip_grad_norm is not None:
        clip = partial(clip_grad_norm_, model, cfg.optim.clip_grad_norm,
                       job.mesh["gp"].get_group() if job.gp > 1 else None)
    # Resumed with nothing left to train (a restart or resume=auto after the last checkpoint,
    # or at train.max_steps): the last record stands.
    record = _last_record(run_dir) if cfg.resume or job.restarted else {}
    stop.install()        # from here on a signal stops at a step boundary with a checkpoint
    for epoch in range(epochs_done, cfg.train.epochs):
        remaining = None if cfg.train.max_steps is None else cfg.train.max_steps - global_step
        if remaining is not None and remaining <= 0:
            break
        done_before = sums.steps if sums else 0
        train_loader.set_epoch(epoch, skip_batches=done_before)
        lr = schedule.at(global_step)

        def log_step(stats, label=f"epoch {epoch + 1}/{cfg.train.epochs}"):
            lr = schedule.at(stats["step"] - 1)
            writer.scalars("train", dict(loss=stats["loss"], lr=lr,
                                         images_per_s=stats["images_per_s"] * job.dp_size,
                                         step_time_s=stats["step_time_s"],
                                         data_wait_s=stats["data_wait_s"],
                                         comm_bytes_per_step=stats["comm_bytes_per_step"]),
                           stats["step"])
            log.info(step_line(stats, label=label, steps_in_epoch=len(train_loader),
                               total_steps=total_steps, lr=lr, replicas=job.dp_size,
                               evaluation_s=record.get("eval_time_s")))

        def checkpoint_inside(step, epoch_sums, epoch=epoch, first=global_step - done_before):
            # Also where train.max_steps ends the run inside the epoch: a resume with more steps
            # then finishes this epoch instead of skipping its rest.
            due = every and step % every == 0 or step == cfg.train.max_steps
            if ema is not None:
                ema.update()
            if due and step - first < len(train_loader):
                average_batch_norm_statistics(model, job.dp_group)
                save(Position(epoch, step), epochs_done=epoch, global_step=step,
                     sums=epoch_sums())

        try:
            result = train_one_epoch(step_model, train_loader, optimizer, device=job.device,
                                     amp=job.amp, lr_at=schedule.at,
                                     label_smoothing=cfg.optim.label_smoothing, clip=clip,
                                     max_steps=remaining, first_step=global_step,
                                     log_every=cfg.train.log_every, on_log=log_step,
                                     on_step=checkpoint_inside, start=sums)
        except StopAtStep as stopped:
            average_batch_norm_statistics(model, job.dp_group)
            position = Position(epoch, stopped.step)
            save(position, epochs_done=epoch, global_step=stopped.step, sums=stopped.sums)
            writer.close()
            raise RunStopped(stopped.signal_number, stop.signal_name(stopped.signal_number),
                             stopped.step,
                             epoch_dir(run_dir, position)) from None
        global_step += result.steps - done_before
        sums = None
        average_batch_norm_statistics(model, job.dp_group)
        record = _evaluate_epoch(cfg, job, model, ema, test_loader, result, epoch, global_step,
                                 lr, train_loader.num_classes >= TOP5_CLASSES)
        writer.epoch(record)
        if result.steps < len(train_loader):     # train.max_steps: checkpoint_inside saved it
            break
        save(epoch + 1, epochs_done=epoch + 1, global_step=global_step)
    writer.close()
    return record


def _evaluate_epoch(cfg, job, model, ema, test_loader, result, epoch, global_step, lr,
                    top5) -> dict:
    """The epoch's record (metrics.jsonl) and its log line: the training sums over the dp
    replicas and the test set's loss and accuracy (top-5 too for ``top5``), the weight
    average's (``ema``) where there is one, and how long the evaluation took (what the step
    lines' ETA counts per evaluation still to come)."""
    started = time.perf_counter()
    test_loss, test_acc, test_acc5 = evaluate(model, test_loader, device=job.device,
                                              amp=job.amp, dp_group=job.dp_group)
    totals = _over_replicas(result, job)
    record = dict(epoch=epoch + 1, step=global_step, train_loss=totals.mean_loss,
                  train_acc=totals.accuracy, test_loss=test_loss, test_acc=test_acc, lr=lr,
                  epoch_time_s=result.seconds, images_per_s=totals.samples / result.seconds,
                  comm_bytes_per_step=result.comm_bytes_per_step)
    if top5:
        record["test_acc5"] = test_acc5
    averaged = ""
    if ema is not None:
        with ema.swapped_in():
            average_batch_norm_statistics(model, job.dp_group)
            record["ema_test_loss"], record["ema_test_acc"], ema_acc5 = evaluate(
                model, test_loader, device=job.device, amp=job.amp, dp_group=job.dp_group)
        if top5:
            record["ema_test_acc5"] = ema_acc5
        averaged = f" | EMA test acc {record['ema_test_acc']:.2f}%"
    record["eval_time_s"] = eval_time_s = time.perf_counter() - started
    log.info(f"epoch {epoch + 1}/{cfg.train.epochs} step {global_step}: train loss "
             f"{record['train_loss']:.4f} acc {record['train_acc']:.2f}% | test loss "
             f"{test_loss:.4f} acc {test_acc:.2f}%" + (f" top-5 {test_acc5:.2f}%" if top5 else "")
             + averaged + f" | {record['images_per_s']:,.0f} img/s, {result.seconds:.1f} s "
             f"training + {eval_time_s:.1f} s evaluation")
    return record


def _finish(run_dir, job, model, ema, meta, record) -> None:
    """The consolidated single-device ``model.pt`` (and the weight average's ``model_ema.pt``),
    written by rank 0."""
    _write_consolidated(run_dir / "model.pt", job, model, meta)
    if ema is not None:
        with ema.swapped_in():
            _write_consolidated(run_dir / "model_ema.pt", job, model, meta)
    log.info(f"final test accuracy {record.get('test_acc', float('nan')):.2f}% "
             f"(consolidated single-device weights: {run_dir / 'model.pt'})")
    job.barrier()   # rank 0 hosts the rendezvous store: nobody leaves while others use it


def _write_consolidated(path: Path, job, model, meta) -> None:
    state = consolidate_state_dict(model, job.mesh) if job.mesh is not None else model.state_dict()
    _require_finite(state.items(), path)
    problem = None
    if job.rank == 0:
        try:
            write_model_file(path, state, meta)
        except RunError as error:
            problem = str(error)
    job.raise_first(problem, RunError)


def _require_finite(named_tensors, path) -> None:
    """No file holding NaN or infinite weights is ever written (the loop's guard stops a
    diverging run first; this is the last line)."""
    bad = [name for name, t in named_tensors if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise RunError(f"not writing {path}: {len(bad)} tensors are not finite (first: "
                       f"{bad[0]}); the run diverged, start again with a lower optim.lr")


def _save_checkpoint(run_dir, at, *, job, model, optimizer, schedule, ema, meta, keep,
                     epochs_done, global_step, sums=None) -> None:
    """A checkpoint at ``at`` (an epoch's end, or a Position inside one with the epoch's
    ``sums``). Replica 0 of each gp rank writes its shard atomically, with every replica's RNG
    state; rank 0 marks it complete only after all have written, so a job killed mid-write never
    leaves a "latest" that cannot load, and only then deletes the checkpoints beyond the newest
    ``keep``. A failed write (a full disk) stops every rank with its cause, the checkpoint left
    incomplete."""
    rngs, problem = job.gather_dp(rng_state(job.device)), None
    sums = _over_replicas(sums, job) if sums else None
    if job.dp_rank == 0:
        path, state = rank_file(run_dir, at, job.gp_rank), unwrap(model).state_dict()
        try:
            _require_finite(state.items(), path)
            atomic_save(dict(model=state, optimizer=optimizer.state_dict(),
                             schedule=schedule.describe(), rng=rngs, epochs_done=epochs_done,
                             ema=ema.state_dict() if ema is not None else None,
                             global_step=global_step, epoch_sums=asdict(sums) if sums else None,
                             meta=meta), path)
        except RunError as error:
            problem = f"rank {job.rank}: {error}"
    job.raise_first(problem, RunError)
    if job.rank == 0:
        try:
            mark_complete(run_dir, at)
            prune(run_dir, keep)
        except OSError as error:
            problem = f"rank 0: cannot mark {epoch_dir(run_dir, at)} complete ({error})"
    # No rank goes on (or exits, after a stop) before the checkpoint is marked complete: a
    # launcher that saw the others end could stop rank 0 while it marks it.
    job.raise_first(problem, RunError)


def _over_replicas(sums: EpochSums, job) -> EpochSums:
    """An interrupted epoch's sums added over the dp replicas: what its checkpoint keeps, since
    any number of replicas may resume it (replica 0 carries the totals on: ``_restore``)."""
    loss, correct, samples = all_reduce_values([sums.loss, sums.correct, sums.samples],
                                               device=job.device, group=job.dp_group).tolist()
    return replace(sums, loss=loss, correct=int(correct), samples=int(samples))


def _hand_over(signal_number: int) -> None:
    """Where submitit runs the job, its handler of the stop signal requeues it (on rank 0,
    which it then ends); the other ranks leave with 0, so that srun's kill-on-bad-exit cannot
    end rank 0 before it has requeued."""
    try:
        if stop.hand_over(signal_number):
            sys.exit(0)
    except Exception as error:        # submitit's: timed out too often, not requeued
        print(f"not requeued: {error}", file=sys.stderr)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    stop.interrupt_before_training()     # cli did; a launcher calling main (submitit) did not
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN and "TORCHELASTIC_RUN_ID" in os.environ:
            raise ConfigError("Hydra sweeps (-m) must not run inside torchrun: each sweep job "
                              "launches its own ranks (use the submitit launcher, or one "
                              "torchrun per value)")
        check_known_keys(cfg, TrainConfig)
        if (stopped := stopped_earlier()) is not None:     # torchrun restarting a stopped job
            end(stop.EXIT_STOPPED, stopped, only_rank0=True)
        if stop_requested_before_start():
            raise KeyboardInterrupt
        config_files = {"config.yaml": OmegaConf.to_yaml(cfg),
                        "overrides.yaml": OmegaConf.to_yaml(
                            list(HydraConfig.get().overrides.task))}
        run(OmegaConf.to_object(cfg), run_dir, config_files)
        if env_rank() == 0:
            report_exit(0, "finished")     # over what an earlier, restarted round reported
    except RunStopped as stopped:
        end(stop.EXIT_STOPPED, f"stopped: {stopped}", only_rank0=True,
             then=lambda: _hand_over(stopped.signal_number))
    except KeyboardInterrupt:            # Ctrl-C or SIGTERM before training began (stop.py)
        _interrupted(run_dir)
    except (ConfigError, DataError, RunError) as error:   # a clear message, not a stack trace
        remove_if_empty(run_dir)
        end(2, f"error: {error}", own=isinstance(error, RankError))
    except (dist.DistError, RuntimeError) as error:
        line = peer_failure(error, "Resume with resume=true once it is fixed")
        if line is None:
            raise
        end(3, line)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _interrupted(run_dir: Path | None) -> None:
    if run_dir is not None:
        remove_if_empty(run_dir)
    end(130, "interrupted before the first training step: nothing was trained, nothing to save")


def cli() -> None:
    """``python -m twolevel_dist.train`` and ``twolevel-train``: the command line's config
    group choices, keys and values checked (one ``error:`` line, exit 2), then Hydra's
    ``main``."""
    # A stop is an interrupt from here on, not only from main's first line: Hydra creates the
    # run directory before main runs, and a rank the signal killed there left it behind.
    stop.interrupt_before_training()
    try:
        check_config_choices(sys.argv[1:])
        check_overrides(sys.argv[1:], TrainConfig)
        main()
    except ConfigError as error:
        end(2, f"error: {error}")
    except KeyboardInterrupt:            # in Hydra's code, before main's own handling
        _interrupted(resolved_run_dir())


if __name__ == "__main__":
    cli()
