"""Shared by the benchmarks: models by config name, step timing, and result files."""

import csv
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twolevel_dist.config import ModelConfig  # noqa: E402
from twolevel_dist.engine.device import autocast  # noqa: E402
from twolevel_dist.layers import to_layout  # noqa: E402
from twolevel_dist.models import build_model  # noqa: E402


def model_from_config(name: str, conv: str, groups: int, num_classes: int = 10):
    """``build_model`` from ``configs/model/<name>.yaml``, so benchmarks and training agree."""
    path = REPO / "configs" / "model" / f"{name}.yaml"
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"error: no model config {path}; choose one of {choices}")
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(path)))
    return build_model(cfg.name, conv=conv, groups=groups, num_classes=num_classes,
                       **cfg.build_kwargs())


def time_steps(step, warmup: int, reps: int, sync=lambda: None) -> list[float]:
    """Wall-clock seconds of ``reps`` calls of ``step`` after ``warmup`` untimed ones; ``sync``
    runs before each start and stop (a barrier across ranks, a device synchronise)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def training_step(model, batch: int, image_size: int = 32, num_classes: int = 10, device="cpu",
                  channels_last: bool = False, amp: bool = False):
    """A closure doing one SGD step (forward, backward, optimizer) on a fixed random batch; with
    ``channels_last``, the images and the convolution weights in that layout, as
    ``train.channels_last=true`` has them; with ``amp``, the forward under bf16 autocast, as
    ``train.amp=true``."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
        to_layout(model, torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(torch.device(device), amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return step


def default_device() -> torch.device:
    """The benchmarks run where training would: this machine's GPU if it has one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def median(values) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    import os
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, Python "
            f"{platform.python_version()}; twolevel_dist commit {commit}")


def write_results(stem: Path, rows: list[dict], title: str, command: str, notes: str = "") -> None:
    """``stem``.csv (all columns) and ``stem``.md (the table, the command, the machine)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [f"# {title}", "", f"Command: `{command}`", "", f"Machine: {machine()}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
