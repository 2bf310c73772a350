"""One training epoch and one evaluation, reading top to bottom. Rank-0 gating is explicit:
only the caller decides who prints and writes."""

import contextlib
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from twolevel_dist.parallel import count_collectives


@dataclass
class EpochResult:
    loss: float
    accuracy: float          # percent
    samples: int
    seconds: float
    steps: int
    comm_bytes_per_step: float


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


def train_one_epoch(model, loader, optimizer, *, device, amp, max_steps, on_step,
                    progress: Progress) -> EpochResult:
    """Trains until the loader ends or ``max_steps`` optimizer steps; ``on_step(step_stats)`` is
    called after each step (the caller logs). Loss and accuracy are over this replica's samples."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    samples = steps = 0
    comm_bytes = 0
    start = time.perf_counter()
    for images, labels in loader:
        if max_steps is not None and steps >= max_steps:
            break
        step_start = time.perf_counter()
        with count_collectives() as comm:
            with _autocast(device, amp):
                logits = model(images)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        samples += labels.numel()
        steps += 1
        comm_bytes += comm.total_bytes()
        step_time = time.perf_counter() - step_start
        on_step(dict(loss=loss, step_time_s=step_time, images_per_s=labels.numel() / step_time,
                     comm_bytes=comm.total_bytes(), comm_calls=comm.total_calls()))
        progress.update(steps, loss.item(), labels.numel() / step_time)
    progress.close()
    seconds = time.perf_counter() - start
    return EpochResult(loss=(loss_sum / max(samples, 1)).item(),
                       accuracy=100.0 * correct.item() / max(samples, 1), samples=samples,
                       seconds=seconds, steps=steps,
                       comm_bytes_per_step=comm_bytes / max(steps, 1))


@torch.no_grad()
def evaluate(model, loader, *, device, amp, dp_group) -> tuple[float, float]:
    """Mean loss and accuracy (percent) over the whole test set: each dp replica evaluates its
    shard, and the sums are added once over the dp group (every gp rank has the same logits)."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)   # loss sum, correct, count
    for images, labels in loader:
        with _autocast(device, amp):
            logits = model(images)
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        totals[1] += (logits.argmax(1) == labels).sum()
        totals[2] += labels.numel()
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(totals, group=dp_group)
    loss_sum, correct, count = totals.tolist()
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
