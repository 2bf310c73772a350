"""Per-rank checkpoints, written atomically, loaded with ``weights_only=True``.

Layout under the run directory:
    checkpoints/epoch_0003/rank00000.pt ...   each rank's shard + optimizer + RNG state
    checkpoints/epoch_0003/COMPLETE           written by rank 0 after every rank has written
A checkpoint without COMPLETE (a job killed while writing) is never "latest".
"""

import os
import re
from pathlib import Path

import torch

from twolevel_dist.errors import ConfigError

COMPLETE = "COMPLETE"
_EPOCH_DIR = re.compile(r"^epoch_(\d+)$")


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def epoch_dir(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}"


def rank_file(run_dir: Path, epoch: int, rank: int) -> Path:
    return epoch_dir(run_dir, epoch) / f"rank{rank:05d}.pt"


def mark_complete(run_dir: Path, epoch: int) -> None:
    marker = epoch_dir(run_dir, epoch) / COMPLETE
    tmp = marker.with_name(f".{COMPLETE}.tmp")
    tmp.write_text(f"epoch {epoch}\n")
    os.replace(tmp, marker)


def latest_complete_epoch(run_dir: Path) -> int | None:
    root = Path(run_dir) / "checkpoints"
    epochs = [int(m.group(1)) for d in (root.iterdir() if root.is_dir() else [])
              if (m := _EPOCH_DIR.match(d.name)) and (d / COMPLETE).is_file()]
    return max(epochs, default=None)


def load_rank_checkpoint(run_dir: Path, epoch: int, rank: int, expected_meta: dict) -> dict:
    path = rank_file(run_dir, epoch, rank)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} is missing: it was written by a job with a "
                          f"different number of ranks; resume with the same torchrun world size")
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_meta(state.get("meta", {}), expected_meta, path)
    return state


def check_meta(found: dict, expected: dict, path) -> None:
    """Refuse a checkpoint written for another model, convolution kind or group layout."""
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise ConfigError(f"checkpoint {path} does not fit this run ({'; '.join(diffs)}); "
                          f"resume with the same model, conv, groups and world size, or start "
                          f"a new run_dir")


def read_model_file(path: str, option: str, hint: str):
    """The contents of a consolidated ``model.pt`` named by config option ``option``, on the CPU;
    a missing or unreadable file is a ConfigError that says so and gives ``hint`` as the fix."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{option}={path}: no such file; {hint}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:       # a truncated or foreign file: say which, not a torch trace
        raise ConfigError(f"{option}={path} is not a readable model.pt ({error}); {hint}") from None
