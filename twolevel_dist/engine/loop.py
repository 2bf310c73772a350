"""One training epoch and one evaluation, reading top to bottom. Rank-0 gating is explicit:
only the caller decides who prints and writes (a long evaluation's progress lines go to the
log, which only rank 0's shows)."""

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from twolevel_dist.engine import stop
from twolevel_dist.engine.device import autocast, clock, peak_memory_bytes
from twolevel_dist.engine.step_flags import StepFlag, StepFlags
from twolevel_dist.engine.stop import signal_name
from twolevel_dist.errors import RunError
from twolevel_dist.parallel import all_reduce_values, count_collectives
from twolevel_dist.progress import Progress

log = logging.getLogger(__name__)
EVAL_PROGRESS_EVERY_S = 30.0


@dataclass
class EpochSums:
    """What an epoch has summed so far, and what ``train_one_epoch`` returns. A checkpoint
    inside an epoch saves it, so that the resumed epoch reports what an uninterrupted one would
    (the loss is summed in float32 on the device either way, so the sums agree to the bit)."""

    loss: float = 0.0          # sum over samples
    correct: int = 0
    samples: int = 0
    steps: int = 0
    seconds: float = 0.0
    comm_bytes: float = 0.0

    @property
    def mean_loss(self) -> float:
        return self.loss / max(self.samples, 1)

    @property
    def accuracy(self) -> float:
        """Percent."""
        return 100.0 * self.correct / max(self.samples, 1)

    @property
    def comm_bytes_per_step(self) -> float:
        return self.comm_bytes / max(self.steps, 1)


class StopAtStep(Exception):
    """A stop was requested (``engine.stop``): every rank leaves ``train_one_epoch`` after the
    same step, with the epoch's sums so far, for the caller to checkpoint."""

    def __init__(self, step: int, sums: "EpochSums", signal_number: int):
        super().__init__(f"stop requested ({signal_name(signal_number)}) at step {step}")
        self.step, self.sums, self.signal_number = step, sums, signal_number


def _stop_if_diverged(flags: list[StepFlag], lag: int, optimizer) -> None:
    """Raise ``RunError`` on every rank (they all read the same flags) at the first step whose
    loss was not finite on some replica."""
    bad = next((flag for flag in flags if flag.nonfinite), None)
    if bad is None:
        return
    lr = optimizer.param_groups[0]["lr"]
    taken = ("no step was taken with it" if lag == 0 else
             "the weights in memory are not finite since (its flag is read a few steps later on "
             "GPUs)")
    raise RunError(f"training diverged: the loss is not finite at step {bad.step} (learning rate "
                   f"{lr:g}); {taken} and no checkpoint or file holds it. Start again with a "
                   f"lower optim.lr (overwrite=true, or another run_dir)")


class _LogWindow:
    """What happened since the last log line: steps, images, bytes sent, loader waits."""

    def __init__(self, device):
        self.device, self.start = device, clock(device)
        self.steps = self.images = self.bytes = 0
        self.wait = 0.0

    def add(self, images: int, comm_bytes: int, waited: float) -> None:
        self.steps, self.images = self.steps + 1, self.images + images
        self.bytes, self.wait = self.bytes + comm_bytes, self.wait + waited

    def report(self, **stats) -> dict:
        """``stats`` with the window's means (synchronising the device once); starts anew."""
        now = clock(self.device)
        stats.update(step_time_s=(now - self.start) / self.steps,
                     data_wait_s=self.wait / self.steps,
                     images_per_s=self.images / (now - self.start),
                     comm_bytes_per_step=self.bytes / self.steps,
                     peak_memory_bytes=peak_memory_bytes(self.device))
        self.__init__(self.device)
        return stats


def _update(optimizer, lr: float | None, clip) -> None:
    """The optimizer step: gradients clipped (``clip``), the step's rate set, then the step."""
    if clip is not None:
        clip()
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    optimizer.step()


def train_one_epoch(model, loader, optimizer, *, device, amp: bool, lr_at=None,
                    label_smoothing: float = 0.0, clip=None, max_steps=None,
                    first_step: int = 0, log_every: int = 20, on_log=None, on_step=None,
                    start: EpochSums | None = None) -> EpochSums:
    """Trains until the loader ends or ``max_steps`` optimizer steps, continuing ``start`` (the
    sums of the epoch's steps before a checkpoint; the loader then skips those batches).
    ``on_step(global_step, sums)`` runs after every step (a checkpoint: ``sums()`` gives the
    epoch's EpochSums so far, at the price of one device sync); every ``log_every`` steps the
    device is synchronised once and ``on_log(stats)`` gets the step (global, and within this
    epoch), the loss, and over the steps since the last report: the mean step time, the part of
    it spent waiting for the loader (host time in ``next``), images/s, bytes communicated, and
    the peak device memory so far (None off GPUs); the caller logs. Loss and accuracy are over
    this replica's samples; ``amp`` is a resolved bool (``engine.device.resolve_amp``).
    ``lr_at(step)`` sets the learning rate of each step (0-based, global; ``engine.schedule``);
    ``clip()`` runs between the backward and the optimizer step (gradient clipping);
    ``label_smoothing`` applies to the training loss.

    The divergence guard (``StepFlags``): a loss that is not finite on any replica raises
    ``RunError`` on every rank, on CPUs before the optimizer steps, on GPUs a few steps later
    without a host sync per step; the flags are drained before ``sums()`` (which ``on_step``
    calls to checkpoint), each log line and the epoch's end, so nothing non-finite is ever
    checkpointed or logged. A stop request (``engine.stop``) on any rank, read from the same
    flags, raises ``StopAtStep`` on every rank after the same step (on_step has run)."""
    model.train()
    start = start or EpochSums()
    loss_sum = torch.tensor(start.loss, dtype=torch.float32, device=device)
    correct = torch.tensor(start.correct, device=device, dtype=torch.long)
    samples, steps, comm_bytes = start.samples, 0, start.comm_bytes
    began = clock(device)

    # Every rank of the job agrees on the flags: a stop signal to any one stops them all.
    flags = StepFlags(device, dist.group.WORLD if dist.is_initialized() else None)
    stop_signal = 0

    def act_on(read: list[StepFlag]) -> None:
        nonlocal stop_signal
        _stop_if_diverged(read, flags.lag, optimizer)
        stop_signal = max([stop_signal] + [flag.stop_signal for flag in read])

    def sums() -> EpochSums:
        # Every flag read first: nothing non-finite is checkpointed. (A stop flag read here
        # ends the epoch after this step, on every rank: they all drain here.)
        act_on(flags.drain())
        return EpochSums(loss=loss_sum.item(), correct=int(correct.item()), samples=samples,
                         steps=start.steps + steps, comm_bytes=comm_bytes,
                         seconds=start.seconds + clock(device) - began)
    window = _LogWindow(device)
    batches = iter(loader)
    while max_steps is None or steps < max_steps:
        asked = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        waited, (images, labels) = time.perf_counter() - asked, batch
        with count_collectives() as comm:
            # Before the forward: the last step's gradients need not live through it.
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                logits = model(images)
                loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            loss.backward()
            flags.post(first_step + steps + 1, loss, stop.requested())
            act_on(flags.due(first_step + steps + 1))
            _update(optimizer, lr_at(first_step + steps) if lr_at else None, clip)
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        samples, steps = samples + labels.numel(), steps + 1
        comm_bytes += comm.total_bytes()
        window.add(labels.numel(), comm.total_bytes(), waited)
        if on_step is not None:
            on_step(first_step + steps, sums)
        if log_every and (first_step + steps) % log_every == 0:
            act_on(flags.drain())
            stats = window.report(step=first_step + steps, epoch_step=start.steps + steps,
                                  loss=loss.item())
            if on_log is not None:
                on_log(stats)
        if stop_signal:
            raise StopAtStep(first_step + steps, sums(), stop_signal)
    return sums()


@torch.no_grad()
def evaluate(model, loader, *, device, amp: bool, dp_group) -> tuple[float, float, float]:
    """Mean loss, top-1 and top-5 accuracy (percent) over the whole test set: each dp replica
    evaluates its shard, and the sums are added once over the dp group (every gp rank has the
    same logits). Quiet when short; one that takes longer than ``EVAL_PROGRESS_EVERY_S`` logs
    how far it is that often (batches queued, on a GPU), and when it is done."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    progress = Progress(log, "evaluating the test set", len(loader), unit="batches",
                        every_s=EVAL_PROGRESS_EVERY_S, announce=False)
    for batch, (images, labels) in enumerate(loader, 1):
        with autocast(device, amp):
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        totals[1] += (top5[:, 0] == labels).sum()
        totals[2] += (top5 == labels[:, None]).any(dim=1).sum()
        totals[3] += labels.numel()
        progress.update(batch)
    loss_sum, top1, top5, count = all_reduce_values(totals, device=device,
                                                    group=dp_group).tolist()
    progress.finish()
    return loss_sum / count, 100.0 * top1 / count, 100.0 * top5 / count


@torch.no_grad()
def average_batch_norm_statistics(model, dp_group) -> None:
    """BN running statistics differ between dp replicas (each saw its own shard); average them
    before evaluating and checkpointing, as timm's distribute_bn does."""
    if dp_group is None or dist.get_world_size(dp_group) == 1:
        return
    world = dist.get_world_size(dp_group)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer, group=dp_group)
                buffer.div_(world)
