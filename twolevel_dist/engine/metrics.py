"""Rank-0 metric sinks: ``metrics.jsonl`` (one line per epoch), TensorBoard scalars, and the
log line printed every ``train.log_every`` steps."""

import json
import math
from pathlib import Path

from twolevel_dist.errors import ConfigError


class MetricsWriter:
    """Writes only where ``enabled`` (rank 0); the other ranks hold a no-op writer.
    ``purge_step``: where a resumed run goes on from (the checkpoint's step + 1): TensorBoard
    hides what the run logged at that step and after before it stopped, which it logs again."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool,
                 purge_step: int | None = None):
        self.enabled = enabled
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"),
                                    purge_step=purge_step)

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(_strict(record), allow_nan=False) + "\n")
        self.scalars("epoch", {k: v for k, v in record.items() if k not in ("epoch", "step")},
                     record["step"])
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def step_line(stats: dict, *, label: str, steps_in_epoch: int, total_steps: int, lr: float,
              replicas: int = 1, evaluation_s: float | None = None) -> str:
    """One line for a log that is not a terminal (a SLURM output file, train.log): where the
    run is, the loss, the speed of the last steps, how long the rest should take and, on GPUs,
    the peak memory. ``stats`` is what ``train_one_epoch`` reports; images/s is summed over the
    ``replicas`` (data-parallel replicas each see their own images).

    The ETA: the remaining steps at the recent speed, plus the evaluations still to come (one
    after each epoch, and one where ``total_steps`` ends the run) at the last evaluation's
    measured time ``evaluation_s``; before any evaluation has been timed, the line says how many
    it leaves out."""
    step = stats["step"]
    evaluations = max(math.ceil(total_steps / steps_in_epoch) - math.ceil(step / steps_in_epoch)
                      + 1, 0)
    eta = max(total_steps - step, 0) * stats["step_time_s"] + evaluations * (evaluation_s or 0)
    hours, rest = divmod(int(eta), 3600)
    line = (f"{label} [{stats['epoch_step']}/{steps_in_epoch}] step {step}/"
            f"{total_steps} loss {stats['loss']:.4f} lr {lr:.4g} | "
            f"{stats['images_per_s'] * replicas:,.0f} img/s, step {stats['step_time_s']:.3f} s "
            f"(data wait {stats['data_wait_s']:.3f} s) | ETA {hours}:{rest // 60:02d}:"
            f"{rest % 60:02d}")
    if evaluation_s is None and evaluations:
        line += f" + {evaluations} evaluation{'s' if evaluations > 1 else ''} not yet timed"
    if stats.get("peak_memory_bytes") is not None:
        line += f" | peak memory {stats['peak_memory_bytes'] / 2**30:.2f} GiB"
    return line


def _strict(record: dict) -> dict:
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in record.items()}


def read_metrics(run_dir) -> list[dict]:
    """The records of ``metrics.jsonl``. A torn last line (a job killed while appending) is
    left out; a bad line anywhere else is an error naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise ConfigError(f"{path}, line {number}, is not JSON: {line[:80]!r}; fix or "
                              f"delete that line") from None
    return records


def truncate_metrics(run_dir, epochs_done: int) -> None:
    """Keep only the epochs a resumed run will not redo (a job may have logged an epoch and died
    before its checkpoint was complete); a torn last line is repaired (dropped) on the way."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        kept = [r for r in read_metrics(run_dir) if r["epoch"] <= epochs_done]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
