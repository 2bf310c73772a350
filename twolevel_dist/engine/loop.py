"""One training epoch and one evaluation, reading top to bottom. Rank-0 gating is explicit:
only the caller decides who prints and writes."""

import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from twolevel_dist.engine.device import autocast, clock
from twolevel_dist.errors import RunError
from twolevel_dist.parallel import all_reduce_values, count_collectives


@dataclass
class EpochResult:
    loss: float
    accuracy: float          # percent
    samples: int
    seconds: float
    steps: int
    comm_bytes_per_step: float


class Progress:
    """A one-line progress display on rank 0, only when stdout is a terminal."""

    def __init__(self, enabled: bool, total: int, label: str):
        self.enabled = enabled and sys.stdout.isatty()
        self.total, self.label = total, label

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        if self.enabled:
            print(f"\r{self.label} {step}/{self.total} loss {loss:.4f} {images_per_s:,.0f} img/s",
                  end="", flush=True)

    def close(self) -> None:
        if self.enabled:
            print("\r\033[K", end="", flush=True)


def _diverged(loss: torch.Tensor, device, dp_group) -> bool:
    """Whether the loss is NaN or infinite on any replica (gp ranks share their loss). Every
    rank gets the same answer, so all stop in the same step."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float64)
    return all_reduce_values(bad, device=device, group=dp_group, op="max").item() > 0


def train_one_epoch(model, loader, optimizer, *, device, amp: bool, max_steps=None,
                    first_step: int = 0, log_every: int = 20, on_log=None, on_step=None,
                    progress: Progress, dp_group=None) -> EpochResult:
    """Trains until the loader ends or ``max_steps`` optimizer steps. ``on_step(global_step)``
    runs after every step (e.g. a per-step schedule); every ``log_every`` steps the device is
    synchronised once and ``on_log(stats)`` gets the loss and the mean step time, images/s and
    bytes communicated of the steps since the last report (the caller logs). Loss and accuracy
    are over this replica's samples; ``amp`` is a resolved bool (``engine.device.resolve_amp``).

    The divergence guard: a loss that is not finite on any replica raises ``RunError`` on every
    rank before the optimizer steps, so the weights and their checkpoints stay finite. It is the
    one host sync per step (a flag of one number, reduced over ``dp_group``)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    samples = steps = 0
    comm_bytes = 0
    start = window_start = clock(device)
    window_steps = window_images = window_bytes = 0
    for images, labels in loader:
        if max_steps is not None and steps >= max_steps:
            break
        with count_collectives() as comm:
            # Before the forward: the last step's gradients need not live through it.
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, amp):
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
            loss.backward()
            if _diverged(loss, device, dp_group):
                raise RunError(
                    f"training diverged: the loss is {loss.item()} at step "
                    f"{first_step + steps + 1} (learning rate "
                    f"{optimizer.param_groups[0]['lr']:g}); no step was taken with it and no "
                    f"checkpoint holds it. Start again with a lower optim.lr (overwrite=true, or "
                    f"another run_dir)")
            optimizer.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        samples += labels.numel()
        steps += 1
        comm_bytes += comm.total_bytes()
        window_steps, window_images = window_steps + 1, window_images + labels.numel()
        window_bytes += comm.total_bytes()
        if on_step is not None:
            on_step(first_step + steps)
        if log_every and steps % log_every == 0:
            now = clock(device)
            stats = dict(step=first_step + steps, loss=loss.item(),
                         step_time_s=(now - window_start) / window_steps,
                         images_per_s=window_images / (now - window_start),
                         comm_bytes_per_step=window_bytes / window_steps)
            progress.update(steps, stats["loss"], stats["images_per_s"])
            if on_log is not None:
                on_log(stats)
            window_start, window_steps, window_images, window_bytes = now, 0, 0, 0
    progress.close()
    seconds = clock(device) - start
    return EpochResult(loss=(loss_sum / max(samples, 1)).item(),
                       accuracy=100.0 * correct.item() / max(samples, 1), samples=samples,
                       seconds=seconds, steps=steps,
                       comm_bytes_per_step=comm_bytes / max(steps, 1))


@torch.no_grad()
def evaluate(model, loader, *, device, amp: bool, dp_group) -> tuple[float, float]:
    """Mean loss and accuracy (percent) over the whole test set: each dp replica evaluates its
    shard, and the sums are added once over the dp group (every gp rank has the same logits)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, correct, count
    for images, labels in loader:
        with autocast(device, amp):
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += labels.numel()
    loss_sum, correct, count = all_reduce_values(totals, device=device, group=dp_group).tolist()
    return loss_sum / count, 100.0 * correct / count


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
