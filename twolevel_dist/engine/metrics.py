"""Rank-0 metric sinks: ``metrics.jsonl`` (one line per epoch) and TensorBoard scalars."""

import json
from pathlib import Path


class MetricsWriter:
    """Writes only where ``enabled`` (rank 0); the other ranks hold a no-op writer."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.scalars("epoch", {k: v for k, v in record.items() if k not in ("epoch", "step")},
                     record["step"])
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir, epochs_done: int) -> None:
    """Keep only the epochs a resumed run will not redo (a job may have logged an epoch and died
    before its checkpoint was complete)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.is_file():
        kept = [r for r in read_metrics(run_dir) if r["epoch"] <= epochs_done]
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
