"""The training configuration: a typed schema (Hydra structured config) and the checks that turn
a bad value into one clear error before anything is written."""

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import CONV_KINDS
from twolevel_dist.parallel import check_device
from twolevel_dist.selfgroup.grouping import SCOPES


def _config_dir() -> str:
    """configs/ as an absolute path: Hydra resolves a relative config_path against the calling
    module's package when the entry point is a console script (twolevel-train). In a checkout
    (and an editable install) it is the repository's configs/ beside the package; a wheel
    carries it inside the package (pyproject.toml maps it to twolevel_dist/configs)."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return str(installed if installed.is_dir() else package.parent / "configs")


CONFIG_DIR = _config_dir()


@dataclass
class ModelConfig:
    name: str = "wrn"                    # build_model name: wrn, wrn_imagenet, mobilenet_v2
    depth: Optional[int] = None
    widen: Optional[int] = None
    dropout: Optional[float] = None
    width_mult: Optional[float] = None
    coarse_last_conv: Optional[bool] = None
    small_input: Optional[bool] = None   # mobilenet_v2: strides for 32x32 images

    def build_kwargs(self) -> dict[str, Any]:
        keys = ("depth", "widen", "dropout", "width_mult", "coarse_last_conv", "small_input")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class DatasetConfig:
    name: str = "synthetic"              # synthetic, cifar10, cifar100, imagefolder, imagenet
    root: Optional[str] = None
    download: bool = False
    image_size: Optional[int] = None
    num_classes: Optional[int] = None    # synthetic only
    train_size: int = 10000              # synthetic only
    test_size: int = 2000                # synthetic only
    # Train on this many images, the same class-balanced subset for every run (the first
    # train_images / classes of each class); null: all. The test set is always whole.
    train_images: Optional[int] = None
    workers: int = 8                     # streaming (imagenet) loader workers
    # imagefolder: where archives are extracted and decoded arrays cached. null: $TWOLEVEL_CACHE,
    # else root/.twolevel_cache (a writable folder) or ~/.cache/twolevel_dist (README: Caches)
    cache_dir: Optional[str] = None


@dataclass
class ConvConfig:
    kind: str = "gc2l"
    # GC-2L across ranks: overlap the all-gather with the local filters (the taps path). null:
    # by device, on for CPU ranks, off on GPUs (the fused convolution); see README.
    overlap: Optional[bool] = None


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    # The linear scaling rule: lr was tuned at this global batch; the rate used is
    # lr x train.batch_size / lr_reference_batch. null: lr as given. train.batch_size is the
    # global batch, so adding dp replicas alone changes nothing; this is for growing the batch.
    lr_reference_batch: Optional[int] = None
    label_smoothing: float = 0.0         # of the training loss (evaluation: plain cross-entropy)
    # Clip the gradients to this global L2 norm, over the whole model (every gp shard, after the
    # dp average): what clip_grad_norm_ does on one device. null: no clipping.
    clip_grad_norm: Optional[float] = None


@dataclass
class ScheduleConfig:
    name: str = "multistep"              # multistep, cosine (per epoch) or constant
    # multistep: fractions of train.epochs (the paper's 60/120/160 of 200), or whole epochs
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])
    gamma: float = 0.1
    # A linear warmup from lr / warmup to lr, in epochs (may be fractional) or in steps; one.
    warmup_epochs: float = 0.0
    warmup_steps: int = 0


@dataclass
class TrainLoopConfig:
    epochs: int = 200
    # Stop after this many optimizer steps in all; inside an epoch, with a checkpoint there
    # (a resume with more steps finishes the epoch).
    max_steps: Optional[int] = None
    batch_size: int = 128                # global batch: split over the dp replicas
    amp: Optional[bool] = None           # bf16 autocast; null: on for GPUs, off for CPUs
    tf32: bool = True                    # GPUs: TF32 matrix products and convolutions
    channels_last: bool = False
    compile: bool = False
    log_every: int = 20
    # Checkpoints kept: the newest K complete ones (older ones deleted once a newer one is
    # complete); more than one, so that a damaged newest one can be skipped. null: all.
    keep_checkpoints: Optional[int] = 3
    # Also checkpoint inside epochs, every this many optimizer steps (an ImageNet epoch is hours);
    # a resumed run continues at the next batch, with the losses of an uninterrupted one.
    checkpoint_every_steps: Optional[int] = None
    # Keep an exponential moving average of the weights with this decay (e.g. 0.999): each rank
    # its own shard's; evaluated every epoch, written consolidated to model_ema.pt. null: none.
    ema_decay: Optional[float] = None


@dataclass
class DistConfig:
    # The longest a rank waits for the others in one collective or in the rendezvous (rank 0's
    # first data preparation included) before the job fails instead of hanging.
    timeout_s: float = 1800
    # The longest a rank waits for rank 0's rendezvous when the job starts without torchrun
    # (srun, submitit): a rank 0 that failed to start ends the others this soon.
    startup_timeout_s: float = 60


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    conv: ConvConfig = field(default_factory=ConvConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    groups: Optional[int] = None         # N; default: the world size
    seed: int = 0
    # auto: cuda:LOCAL_RANK where CUDA is available, else cpu; cpu: the CPU (gloo) even where a
    # GPU is; cuda: a GPU, refused where none is visible.
    device: str = "auto"
    eval_only: bool = False              # replaced by twolevel_dist.evaluate: refused, saying so
    init_from: Optional[str] = None      # a consolidated model.pt (train or compress) to start from
    # true: continue from run_dir's newest complete checkpoint; auto: that where there is one,
    # else start afresh (requeued jobs); false: a fresh run.
    resume: Any = False
    overwrite: bool = False              # start afresh in a run_dir that holds a run (replaces it)
    run_dir: Optional[str] = None        # default: outputs/<model>-<conv>/<job id>
    tensorboard: bool = True


SCHEDULES = ("multistep", "cosine", "constant")


def validate(cfg: TrainConfig) -> None:
    """Semantic checks the typed schema cannot express."""
    check_device(cfg.device)
    if cfg.conv.kind not in CONV_KINDS:
        raise ConfigError(f"conv={cfg.conv.kind!r} is not a convolution kind; choose one of "
                          f"{sorted(CONV_KINDS)} (e.g. conv=gc2l)")
    if cfg.groups is not None and cfg.groups < 1:
        raise ConfigError(f"groups={cfg.groups} must be a positive integer (or null for the "
                          f"world size)")
    t = cfg.train
    for name in ("epochs", "batch_size", "log_every"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be at least 1")
    for name in ("max_steps", "keep_checkpoints", "checkpoint_every_steps"):
        if getattr(t, name) is not None and getattr(t, name) < 1:
            raise ConfigError(f"train.{name}={getattr(t, name)} must be at least 1 (or null)")
    if cfg.dist.timeout_s <= 0:
        raise ConfigError(f"dist.timeout_s={cfg.dist.timeout_s} must be positive (seconds a "
                          f"rank waits for the others before the job fails)")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be positive")
    for name in ("momentum", "weight_decay"):
        if getattr(cfg.optim, name) < 0:
            raise ConfigError(f"optim.{name}={getattr(cfg.optim, name)} must be >= 0 (0 turns "
                              f"it off)")
    if not 0 < cfg.schedule.gamma <= 1:
        raise ConfigError(f"schedule.gamma={cfg.schedule.gamma} must be in (0, 1]: the factor "
                          f"the learning rate is multiplied by at each milestone (e.g. 0.1)")
    if cfg.schedule.name == "multistep":
        _validate_milestones(list(cfg.schedule.milestones), t.epochs)
    _validate_recipes(cfg)
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    if cfg.schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={cfg.schedule.name!r} is not one of {SCHEDULES}")
    if cfg.resume not in (True, False, "auto"):
        raise ConfigError(f"resume={cfg.resume!r} is not one of true, false, auto")
    if cfg.eval_only:
        raise ConfigError("eval_only=true is replaced by its own command, which evaluates a "
                          "run's model.pt or newest checkpoint in any layout and writes nothing: "
                          "python -m twolevel_dist.evaluate run_dir=<the run's directory>")
    if cfg.resume is True and not cfg.run_dir:
        raise ConfigError("resume=true needs run_dir=<the directory of the run to continue>")
    if cfg.resume and cfg.overwrite:
        raise ConfigError(f"resume={str(cfg.resume).lower()} continues the run in run_dir and "
                          f"overwrite=true replaces it: choose one")


def _validate_milestones(milestones: list[float], epochs: int) -> None:
    shown = [int(m) if float(m).is_integer() else m for m in milestones]
    fractions = [m for m in milestones if 0 < m < 1]
    if fractions and len(fractions) < len(milestones):
        raise ConfigError(f"schedule.milestones={shown} mixes fractions of train.epochs with "
                          f"epochs; give all as fractions in (0, 1) (e.g. [0.3, 0.6, 0.8]) or "
                          f"all as whole epochs (e.g. [60, 120, 160])")
    if fractions:
        return
    late = [m for m in shown if not (float(m).is_integer() and 1 <= m < epochs)]
    if late:
        raise ConfigError(
            f"schedule.milestones={shown}: {late} not whole epochs inside [1, train.epochs="
            f"{epochs}), so the learning rate would never decay there; give epochs where it "
            f"should drop (e.g. 'schedule.milestones=[{max(epochs // 2, 1)}]'), fractions of "
            f"train.epochs (e.g. [0.5]), [] for a constant rate, or use schedule=cosine")


def _validate_recipes(cfg: TrainConfig) -> None:
    """Warmup, lr scaling, label smoothing, clipping, EMA."""
    s, o, t = cfg.schedule, cfg.optim, cfg.train
    if s.warmup_epochs < 0 or s.warmup_steps < 0 or (s.warmup_epochs and s.warmup_steps):
        raise ConfigError(f"schedule.warmup_epochs={s.warmup_epochs}, schedule.warmup_steps="
                          f"{s.warmup_steps}: give one of them (>= 0), the other 0")
    if o.lr_reference_batch is not None and o.lr_reference_batch < 1:
        raise ConfigError(f"optim.lr_reference_batch={o.lr_reference_batch} must be a batch "
                          f"size >= 1 (the global batch optim.lr was tuned at), or null")
    if not 0 <= o.label_smoothing < 1:
        raise ConfigError(f"optim.label_smoothing={o.label_smoothing} must be in [0, 1) "
                          f"(e.g. 0.1; 0 turns it off)")
    if o.clip_grad_norm is not None and o.clip_grad_norm <= 0:
        raise ConfigError(f"optim.clip_grad_norm={o.clip_grad_norm} must be positive (the "
                          f"largest global gradient norm, e.g. 1.0), or null for no clipping")
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in (0, 1) (e.g. 0.999), or "
                          f"null for no moving average")


def _unknown_keys(values: dict, schema, prefix: str = "") -> list[str]:
    """Dotted keys of ``values`` (a plain dict) that the dataclass instance ``schema`` lacks,
    each with the closest known key when there is one."""
    names = [f.name for f in dataclasses.fields(schema)]
    unknown = []
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            unknown.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)"
                                               if close else ""))
        elif dataclasses.is_dataclass(getattr(schema, key)) and isinstance(value, dict):
            unknown += _unknown_keys(value, getattr(schema, key), f"{prefix}{key}.")
    return unknown


def check_config_choices(args: list[str], config_dir: str = CONFIG_DIR) -> None:
    """Refuse a config group choice on the command line that names no file of its group
    (``model=wrn99``), in one line with the choices, before Hydra would report it in a dozen.
    Sweeps list their values with commas (``-m model=wrn10_2,wrn16_4``); Hydra's own groups
    (``hydra/launcher=...``, from plugins) and sweep functions (``choice(...)``) are Hydra's
    to check. First, that the configs are there at all (a package copied by hand, without
    them)."""
    if not Path(config_dir).is_dir():
        raise ConfigError(f"the configs folder {config_dir} is missing: this copy of the "
                          f"twolevel_dist package has neither the repository's configs/ beside "
                          f"it nor its own; install it with pip (pip install -e . in a clone, "
                          f"what launch/setup_env.sh does, or pip install .)")
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        folder = Path(config_dir) / key
        if key.startswith("hydra") or "." in key or "(" in value or not folder.is_dir():
            continue
        choices = sorted(path.stem for path in folder.glob("*.yaml"))
        for choice in value.split(","):
            if choice not in choices and choice != "null":
                close = difflib.get_close_matches(choice, choices, n=1)
                hint = f" (did you mean {key}={close[0]}?)" if close else ""
                raise ConfigError(f"{key}={choice} names no {key} config{hint}; the choices "
                                  f"are {', '.join(choices)} (configs/{key}/)")


KNOWN_KEYS = "the known keys are in twolevel_dist/config.py and configs/"


def check_overrides(args: list[str], schema_type, config_dir: str = CONFIG_DIR,
                    known: str = KNOWN_KEYS) -> None:
    """Refuse a ``key=value`` on the command line whose key the schema lacks (with the closest
    known key) or whose value it cannot hold (``train.epochs=abc``), in one line, before Hydra
    would say it in five, on every rank and again in torchrun's restart and traceback. Group
    choices (``model=...``: ``check_config_choices``), Hydra's own keys, ``+key`` (added: checked
    once composed, ``check_known_keys``) and ``~key`` are left to the later checks; of a sweep
    (``groups=2,4``) only the key is checked."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    parser, schema = OverridesParser.create(), OmegaConf.structured(schema_type)
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception as error:      # Hydra's OverrideParseException: its own words
            raise ConfigError(f"cannot read {arg!r}: {str(error).splitlines()[0]}") from None
        key = override.key_or_group
        if (override.is_add() or override.is_delete() or key.startswith("hydra") or "/" in key
                or (Path(config_dir) / key).is_dir()):
            continue
        check_known_keys(_nested(key), schema_type, known)
        if override.is_sweep_override():
            if not {"-m", "--multirun"} & set(args):
                raise ConfigError(f"{arg} lists several values: add -m to sweep over them (one "
                                  f"job each), or write a list as {key}=[...]")
            continue
        try:
            OmegaConf.update(schema, key, override.value(), merge=True)
        except Exception as error:      # OmegaConf's ValidationError: the type it wanted
            raise ConfigError(f"{arg}: {str(error).splitlines()[0]}") from None


def _nested(dotted_key: str) -> dict:
    """``"train.epochs"`` as ``{"train": {"epochs": None}}``: the shape ``check_known_keys``
    reads."""
    *parents, last = dotted_key.split(".")
    nested = {last: None}
    for parent in reversed(parents):
        nested = {parent: nested}
    return nested


def check_known_keys(cfg, schema_type, known: str = KNOWN_KEYS) -> None:
    """Refuse keys the schema does not have. Hydra lets ``+key=value`` add one even to a typed
    config, and the typed object then silently drops it: a typo would be ignored. ``cfg``: a
    config or a plain dict; ``known`` says where the known keys are."""
    values = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=False)
    unknown = _unknown_keys(values, schema_type())
    if unknown:
        raise ConfigError(f"unknown config key(s): {'; '.join(unknown)}; remove them ({known})")


# --- compress: SG-CNN and the self-grouped conversion of a trained SC network ------------------

@dataclass
class FinetuneConfig:
    batch_size: int = 128
    lr: float = 0.01                     # cosine-annealed to 0 over each fine-tuning phase
    momentum: float = 0.9
    weight_decay: float = 5e-4
    amp: Optional[bool] = None           # bf16 autocast; null: on for GPUs, off for CPUs
    channels_last: bool = False
    max_steps: Optional[int] = None      # cap on the steps of one fine-tuning epoch (smoke runs)


@dataclass
class SelfGroupConfig:
    groups: int = 4                      # filter groups per layer (k-means clusters)
    targets: list[float] = field(default_factory=lambda: [0.5, 0.7])   # pruned fractions
    step: float = 0.1                    # progressive schedule: step, 2 step, ..., target
    scheme: str = "local_global"         # local_global: fine-tune after every step and at the end
    local_epochs: int = 1                # fine-tuning after each pruning step (local_global)
    global_epochs: int = 4               # fine-tuning at each target
    scope: str = "global"                # one threshold over all layers, or "layer"
    include_shortcuts: bool = False      # prune 1x1 projection shortcuts too
    include_linear: bool = True          # self-group the classifier head
    linear_until: float = 0.6            # ... while the step's sparsity is at most this


@dataclass
class ConvertConfig:
    conv: str = "gc2l"                   # gc or gc2l
    groups: int = 4
    partitions: list[str] = field(default_factory=lambda: ["selfgroup", "contiguous"])
    epochs: int = 4                      # fine-tuning after the conversion


@dataclass
class CompressConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    checkpoint: Optional[str] = None     # model.pt of a run trained with conv=sc
    method: str = "sg"                   # sg (SG-CNN pruning) or convert (to GC / GC-2L)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    sg: SelfGroupConfig = field(default_factory=SelfGroupConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    seed: int = 0
    run_dir: Optional[str] = None        # default: outputs/<model>-<method>/<time>


COMPRESS_METHODS = ("sg", "convert")
SG_SCHEMES = ("local_global", "global")
SG_SCOPES = SCOPES
PARTITIONS = ("selfgroup", "contiguous")


def validate_compress(cfg: CompressConfig) -> None:
    """Checks of a compress config, before anything is loaded or written."""
    if cfg.method not in COMPRESS_METHODS:
        raise ConfigError(f"method={cfg.method!r} is not one of {COMPRESS_METHODS} (sg: SG-CNN "
                          f"pruning; convert: to GC or GC-2L)")
    if not cfg.checkpoint:
        raise ConfigError("checkpoint=<model.pt> is required: the consolidated weights of an SC "
                          "run (python -m twolevel_dist.train conv=sc groups=1 ...)")
    f = cfg.finetune
    if f.batch_size < 1 or f.lr <= 0:
        raise ConfigError(f"finetune.batch_size ({f.batch_size}) must be >= 1 and finetune.lr "
                          f"({f.lr}) positive")
    if f.max_steps is not None and f.max_steps < 1:
        raise ConfigError(f"finetune.max_steps={f.max_steps} must be at least 1 (or null)")
    if cfg.method == "sg":
        s = cfg.sg
        if s.scheme not in SG_SCHEMES:
            raise ConfigError(f"sg.scheme={s.scheme!r} is not one of {SG_SCHEMES}")
        if not s.targets or any(not 0 < t < 1 for t in s.targets):
            raise ConfigError(f"sg.targets={list(s.targets)} must be pruned fractions strictly "
                              f"between 0 and 1, e.g. [0.5, 0.7]")
        if s.groups < 1 or s.local_epochs < 0 or s.global_epochs < 0:
            raise ConfigError("sg.groups must be >= 1, sg.local_epochs and sg.global_epochs >= 0")
        if s.scope not in SG_SCOPES:
            raise ConfigError(f"sg.scope={s.scope!r} is not one of {SG_SCOPES} (global: one "
                              f"threshold over all layers; layer: one per layer)")
        if not 0 < s.step < 1:
            raise ConfigError(f"sg.step={s.step} must be a pruned fraction per step strictly "
                              f"between 0 and 1, e.g. 0.1")
    else:
        c = cfg.convert
        if c.conv not in ("gc", "gc2l"):
            raise ConfigError(f"convert.conv={c.conv!r}: conversion targets gc or gc2l")
        unknown = [p for p in c.partitions if p not in PARTITIONS]
        if unknown or not c.partitions:
            raise ConfigError(f"convert.partitions={list(c.partitions)}: choose from "
                              f"{PARTITIONS}")
        if c.groups < 2 or c.epochs < 0:
            raise ConfigError(f"convert.groups={c.groups} must be >= 2 and convert.epochs "
                              f"({c.epochs}) >= 0")


# --- evaluate: a training run's test accuracy ----------------------------------------------------

# Every data set key, null by default: evaluate takes the run's own value where none is given.
DatasetOverrides = dataclasses.make_dataclass(
    "DatasetOverrides",
    [(f.name, Optional[f.type], None) for f in dataclasses.fields(DatasetConfig)])


@dataclass
class EvaluateConfig:
    run_dir: Optional[str] = None        # the training run's directory (required)
    gp: Optional[int] = None             # ranks per model; null: 1 for one process, else groups
    device: str = "auto"                 # as train's: auto, cpu or cuda
    weights: str = "model"               # model, or ema: the weight average (train.ema_decay)
    dataset: DatasetOverrides = field(default_factory=DatasetOverrides)


def validate_evaluate(cfg: EvaluateConfig) -> None:
    """Checks of an evaluate config, before anything is read."""
    if not cfg.run_dir:
        raise ConfigError("run_dir=<the directory of a training run> is required: the one its "
                          "train.log and model.pt are in")
    if cfg.gp is not None and cfg.gp < 1:
        raise ConfigError(f"gp={cfg.gp} must be a positive number of ranks per model (or null)")
    if cfg.weights not in ("model", "ema"):
        raise ConfigError(f"weights={cfg.weights!r} is not one of model, ema (the weight "
                          f"average a run with train.ema_decay keeps)")
    check_device(cfg.device)


def _run_id() -> str:
    """A name identical on every rank of one job and different for any two jobs: SLURM's job
    (and step) id, else torchrun's run id (a fresh one per --standalone launch; "none" where a
    multi-node launch gave no --rdzv-id), else, for one process, the time and its pid. Two jobs
    that still meet in one directory are refused by its lock (engine.run_dir)."""
    if os.environ.get("SLURM_JOB_ID"):
        step = os.environ.get("SLURM_STEP_ID")
        return os.environ["SLURM_JOB_ID"] + (f".{step}" if step else "")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return run_id
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return stamp if run_id else f"{stamp}_{os.getpid()}"


_resolved: dict = {"run_dir": None}      # the last directory _run_dir gave in this process


def _run_dir(run_dir, model, job) -> str:
    path = run_dir if run_dir else f"outputs/{model}-{job}/{_run_id()}"
    _resolved["run_dir"] = path
    return path


def resolved_run_dir() -> Path | None:
    """The run directory Hydra last resolved in this process (and created, before the entry
    point's main runs), or None: where an interrupt that lands in Hydra's code finds it."""
    return Path(_resolved["run_dir"]) if _resolved["run_dir"] else None


def register_resolvers() -> None:
    """``${twolevel_run_dir:${run_dir},<model>,<job>}``: the run directory of an entry point."""
    OmegaConf.register_new_resolver("twolevel_run_dir", _run_dir, replace=True)
