"""The learning rate as a function of the optimizer step, rebuilt from the config on every start.

A checkpoint keeps no scheduler state: the rate at step s is computed from the config and s, so
a run resumed with a changed ``train.epochs`` (or warmup, or milestones) continues the new
schedule from the step it reached instead of the old one's (an epoch trained at lr 0 because a
cosine's length came from the checkpoint). The decay is per epoch, as in the paper's recipe (the
rate is constant within an epoch, as ``MultiStepLR`` / ``CosineAnnealingLR`` stepped once per
epoch give it); a linear warmup is per step and multiplies it.
"""

import math
from dataclasses import dataclass


def milestone_epochs(milestones, epochs: int) -> list[int]:
    """The epochs at which a multistep schedule decays. Fractions in (0, 1) are fractions of
    ``epochs`` (the paper's 60/120/160 of 200 are [0.3, 0.6, 0.8]), rounded half up; whole
    numbers >= 1 are epochs as given. Mixed lists are refused by ``config.validate``."""
    if all(0 < m < 1 for m in milestones):
        return [math.floor(m * epochs + 0.5) for m in milestones]
    return [int(m) for m in milestones]


@dataclass(frozen=True)
class LearningRate:
    """lr(step) = base x warmup(step) x decay(epoch of step).

    base          ``optim.lr``, scaled by the linear rule where asked (``scaled_lr``)
    warmup_steps  a linear ramp over the first steps: step s (0-based) gets (s + 1) / warmup
    name          "multistep": x gamma at each milestone epoch reached; "cosine": half a cosine
                  from base to 0 over ``epochs``, per epoch; "constant"
    """

    base: float
    name: str
    epochs: int
    steps_per_epoch: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_steps: int = 0

    def at(self, step: int) -> float:
        """The rate of the optimizer step with 0-based index ``step``."""
        epoch = step // self.steps_per_epoch
        if self.name == "cosine":
            decay = (1 + math.cos(math.pi * epoch / self.epochs)) / 2
        else:        # multistep, repeated multiplication as MultiStepLR applies it
            decay = 1.0
            for _ in range(sum(m <= epoch for m in self.milestones)):
                decay *= self.gamma
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        return self.base * decay * warmup

    def describe(self) -> dict:
        """What a checkpoint records, so that a resume can say what changed."""
        return dict(base=self.base, name=self.name, epochs=self.epochs,
                    steps_per_epoch=self.steps_per_epoch, milestones=list(self.milestones),
                    gamma=self.gamma, warmup_steps=self.warmup_steps)

    def summary(self) -> str:
        """One phrase for the start-up log."""
        if self.name == "cosine":
            shape = f"cosine to 0 over {self.epochs} epochs"
        elif self.milestones:
            shape = f"x {self.gamma:g} at epochs {list(self.milestones)}"
        else:
            shape = "constant"
        warmup = f", linear warmup over {self.warmup_steps} steps" if self.warmup_steps else ""
        return f"lr {self.base:g}, {shape}{warmup}"


def changes(saved: dict | None, now: dict) -> list[str]:
    """The schedule's settings that differ between a checkpoint's and this run's, as
    "key old -> new" (empty for a checkpoint written before schedules were recorded)."""
    if not saved:
        return []
    return [f"{key} {saved.get(key)} -> {value}" for key, value in now.items()
            if saved.get(key) != value]


def scaled_lr(lr: float, batch_size: int, reference_batch: int | None) -> float:
    """The linear scaling rule (Goyal et al., 2017): ``lr`` was tuned at ``reference_batch``
    images per step; at ``batch_size`` (the global batch, over every dp replica) it becomes
    lr x batch_size / reference_batch. None: ``lr`` as given."""
    return lr if reference_batch is None else lr * batch_size / reference_batch
