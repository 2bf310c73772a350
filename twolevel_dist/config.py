"""The training configuration: a typed schema (Hydra structured config) and the checks that turn
a bad value into one clear error before anything is written."""

from dataclasses import dataclass, field
from typing import Any, Optional

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import CONV_KINDS


@dataclass
class ModelConfig:
    name: str = "wrn"                    # build_model name: wrn, wrn_imagenet, mobilenet_v2
    depth: Optional[int] = None
    widen: Optional[int] = None
    dropout: Optional[float] = None
    width_mult: Optional[float] = None
    coarse_last_conv: Optional[bool] = None

    def build_kwargs(self) -> dict[str, Any]:
        keys = ("depth", "widen", "dropout", "width_mult", "coarse_last_conv")
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
    workers: int = 8                     # streaming (imagenet) loader workers


@dataclass
class ConvConfig:
    kind: str = "gc2l"
    overlap: bool = False                # overlap GC-2L's all-gather with the local filters


@dataclass
class OptimConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4


@dataclass
class ScheduleConfig:
    name: str = "multistep"              # multistep or cosine, stepped once per epoch
    milestones: list[int] = field(default_factory=lambda: [60, 120, 160])
    gamma: float = 0.1


@dataclass
class TrainLoopConfig:
    epochs: int = 200
    max_steps: Optional[int] = None      # stop after this many optimizer steps in all
    batch_size: int = 128                # global batch: split over the dp replicas
    amp: bool = False                    # bf16 autocast on GPU
    channels_last: bool = False
    compile: bool = False
    log_every: int = 20


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    conv: ConvConfig = field(default_factory=ConvConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    groups: Optional[int] = None         # N; default: the world size
    seed: int = 0
    eval_only: bool = False
    resume: bool = False                 # continue from run_dir's latest complete checkpoint
    run_dir: Optional[str] = None        # default: outputs/<model>-<conv>-N<groups>/<run id>
    tensorboard: bool = True


SCHEDULES = ("multistep", "cosine")


def validate(cfg: TrainConfig) -> None:
    """Semantic checks the typed schema cannot express."""
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
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"train.max_steps={t.max_steps} must be at least 1 (or null)")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr} must be positive")
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    if cfg.schedule.name not in SCHEDULES:
        raise ConfigError(f"schedule.name={cfg.schedule.name!r} is not one of {SCHEDULES}")
    if cfg.eval_only and not cfg.resume:
        raise ConfigError("eval_only=true evaluates a checkpoint: also set resume=true and "
                          "run_dir=<the run's directory>")
    if cfg.resume and not cfg.run_dir:
        raise ConfigError("resume=true needs run_dir=<the directory of the run to continue>")
