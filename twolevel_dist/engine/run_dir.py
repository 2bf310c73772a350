"""One job per run directory, and no fresh run over an old one.

- A lock held for the job's lifetime: ``.lock``, locked with ``flock`` by rank 0 and naming its
  holder (host, pid, job, start). The kernel releases it when the holder dies, so the lock of a
  dead job is recognised as stale and taken over; a live one refuses the second job by name.
- A fresh run (not ``resume=true``, not a torchrun restart) into a directory that holds a run
  (checkpoints, ``model.pt`` or ``metrics.jsonl``) is refused unless ``overwrite=true``, which
  removes that run's files first.
- Refusals write nothing: the lock is only created once every check has passed.
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from twolevel_dist.errors import ConfigError

LOCK = ".lock"
# What a run leaves in its directory; overwrite=true removes exactly these.
RUN_FILES = ("checkpoints", "model.pt", "metrics.jsonl", "tensorboard", "train.log", ".hydra")


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown job"
    return (f"pid {holder.get('pid')} on {holder.get('host')} (job {holder.get('job')}, "
            f"started {holder.get('started')})")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class RunDirLock:
    """The job's hold on its run directory; ``release`` (or the job's end) lets it go."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd = None
        self.stale_note = None

    def check_free(self) -> None:
        """Refuse if a live job holds the directory (writes nothing); note a dead one's lock."""
        if not self.path.is_file():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if not _try_lock(fd):
                raise ConfigError(
                    f"run_dir={self.path.parent} is in use by {_holder_text(self.path)}: two "
                    f"jobs in one directory would mix their logs and checkpoints; wait for it "
                    f"to end, or give this job another run_dir")
            self.stale_note = (f"took over the stale lock of {_holder_text(self.path)}, which "
                               f"is no longer running")
        finally:
            os.close(fd)          # closing drops the probe's lock

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):                  # another job got here since check_free
            os.close(fd)
            raise ConfigError(f"run_dir={self.path.parent} was just taken by "
                              f"{_holder_text(self.path)}; give this job another run_dir")
        holder = dict(host=socket.gethostname(), pid=os.getpid(),
                      job=os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
                      started=time.strftime("%Y-%m-%d %H:%M:%S"))
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def existing_run(run_dir: Path) -> list[str]:
    """What of a previous run ``run_dir`` holds (empty: nothing)."""
    run_dir = Path(run_dir)
    found = []
    epochs = sorted((run_dir / "checkpoints").glob("epoch_*"))
    if epochs:
        found.append(f"checkpoints up to {epochs[-1].name}")
    found += [name for name in ("model.pt", "metrics.jsonl") if (run_dir / name).exists()]
    return found


def claim(run_dir: Path, *, continuing: bool, overwrite: bool) -> RunDirLock:
    """Rank 0's claim on ``run_dir`` for this job (see the module docstring)."""
    lock = RunDirLock(run_dir)
    lock.check_free()
    previous = existing_run(run_dir)
    if previous and not continuing and not overwrite:
        raise ConfigError(
            f"run_dir={run_dir} already holds a run ({', '.join(previous)}); continue it with "
            f"resume=true, replace it with overwrite=true, or choose another run_dir")
    lock.acquire()
    if previous and overwrite and not continuing:
        for name in RUN_FILES:
            target = Path(run_dir) / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return lock


def remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run directory before a config is checked: a refused command leaves no
    empty directory behind."""
    with contextlib.suppress(OSError):
        Path(run_dir).rmdir()
