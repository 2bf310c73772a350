"""One job per run directory, and no fresh run over an old one.

- A lock held for the job's lifetime: ``.lock``, locked with ``flock`` by rank 0 and naming its
  holder (host, pid, job, start). A job that ends removes it; the kernel releases the ``flock``
  of a job that died without removing it, so such a lock is recognised as stale and taken over
  (and the log says so); a live one refuses the second job by name.
- A fresh run (not ``resume=true``, not a torchrun restart) into a directory that holds a run
  (checkpoints, ``model.pt`` or ``metrics.jsonl``) is refused unless ``overwrite=true``, which
  replaces that run: its files are set aside in ``.replaced/`` at the claim and removed only
  once training begins (``RunDirLock.began``), so a replacement refused on the way (missing
  data, a bad ``init_from``...) or killed before its first step gives the old run back.
- Refusals leave nothing: the lock is only created once these checks have passed, and an
  attempt refused after its claim (missing data, no checkpoint to resume, ...) takes back what
  it wrote (``RunDirLock.take_back``).
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
# Where overwrite=true keeps the replaced run until the replacement's training begins.
REPLACED = ".replaced"


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown job"
    return (f"pid {holder.get('pid')} on {holder.get('host')} (job {holder.get('job')}, "
            f"started {holder.get('started')})")


def _try_lock(fd: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:    # ENOSYS, EOPNOTSUPP, ENOLCK: Lustre mounted without flock, ...
        raise ConfigError(
            f"cannot lock {path} ({error.strerror}): the file system of run_dir does not "
            f"support file locks, which keep two jobs out of one run directory; put run_dir on "
            f"one that does, or have it mounted with them (Lustre: -o flock)") from None


class RunDirLock:
    """The job's hold on its run directory; ``release`` removes it (the kernel lets it go if
    the job dies first)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self._fd = None
        self._footprint = None
        self.stale_note = None
        self.restored_note = None

    def check_free(self) -> None:
        """Refuse if a live job holds the directory (writes nothing); note a dead one's lock."""
        if not self.path.is_file():
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if not _try_lock(fd, self.path):
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
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_lock(fd, self.path)
            except ConfigError:                    # no locks here: leave nothing behind
                os.close(fd)
                if self.path.stat().st_size == 0:
                    self.path.unlink()
                remove_if_empty(self.path.parent)
                raise
            if not locked:                         # another job got here since check_free
                os.close(fd)
                raise ConfigError(f"run_dir={self.path.parent} was just taken by "
                                  f"{_holder_text(self.path)}; give this job another run_dir")
            if _same_file(fd, self.path):
                break
            os.close(fd)    # a job ending as we opened it removed that file: open the new one
        else:
            raise ConfigError(f"run_dir={self.path.parent}: its lock file keeps being replaced "
                              f"by other jobs; give this job another run_dir")
        holder = dict(host=socket.gethostname(), pid=os.getpid(),
                      job=os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID"),
                      started=time.strftime("%Y-%m-%d %H:%M:%S"))
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd = fd
        self._footprint = _Footprint(self.path.parent)

    def take_back(self) -> None:
        """Undo what this attempt wrote since its claim: it was refused before training began.
        In a directory that held nothing before (Hydra creates the run directory before the job
        starts), everything, and the directory; in one that held a run, only this attempt's
        additions (its new files, its lines of ``train.log``, its ``.hydra`` config, which gets
        the earlier one back)."""
        if self._fd is not None:
            self._footprint.take_back()
            _restore_replaced(self.path.parent)
            self.release()
            if self._footprint.was_empty:
                remove_if_empty(self.path.parent)

    def began(self) -> None:
        """Training has begun: the run this one replaces (``overwrite=true``) is gone for good."""
        _remove(self.path.parent / REPLACED)

    def release(self) -> None:
        """Remove the lock, then let it go: a finished job leaves no lock for the next to find
        (a lock file found is a dead job's)."""
        if self._fd is not None:
            if _same_file(self._fd, self.path):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class _Footprint:
    """What a run directory held when this attempt claimed it (nothing of the attempt's yet but
    its lock), to take back exactly what the attempt adds."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.names = {p.name for p in run_dir.iterdir()} - {LOCK}
        self.was_empty = not self.names
        log = run_dir / "train.log"
        self.log_size = log.stat().st_size if log.is_file() else None
        self.hydra = {p.name: p.read_bytes() for p in (run_dir / ".hydra").glob("*")
                      if p.is_file()}

    def take_back(self) -> None:
        for path in self.run_dir.iterdir():
            if path.name not in self.names | {LOCK}:
                _remove(path)
        if self.log_size is not None:
            os.truncate(self.run_dir / "train.log", self.log_size)
        if ".hydra" in self.names:
            for path in (self.run_dir / ".hydra").iterdir():
                if path.name not in self.hydra:
                    _remove(path)
            for name, text in self.hydra.items():
                (self.run_dir / ".hydra" / name).write_bytes(text)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


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
    # A run an overwrite=true attempt killed before its first step set aside is still a run.
    previous = existing_run(run_dir) or existing_run(Path(run_dir) / REPLACED)
    if previous and not continuing and not overwrite:
        raise ConfigError(
            f"run_dir={run_dir} already holds a run ({', '.join(previous)}); continue it with "
            f"resume=true, replace it with overwrite=true, or choose another run_dir")
    lock.acquire()
    if _restore_replaced(run_dir):
        lock.restored_note = (f"restored the run that an overwrite=true attempt, killed "
                              f"before training began, had set aside in {REPLACED}/")
        lock._footprint = _Footprint(Path(run_dir))
    if previous and overwrite and not continuing:
        aside = Path(run_dir) / REPLACED
        aside.mkdir()
        for name in RUN_FILES:
            if (Path(run_dir) / name).exists() or (Path(run_dir) / name).is_symlink():
                os.replace(Path(run_dir) / name, aside / name)
        lock._footprint = _Footprint(Path(run_dir))     # what a refusal may leave: not those
    return lock


def _restore_replaced(run_dir: Path) -> bool:
    """Put back the run an overwrite=true attempt set aside (it never began training: it
    removes the set-aside files when it does), over what that attempt wrote. Whether there was
    one."""
    aside = Path(run_dir) / REPLACED
    if not aside.is_dir():
        return False
    for path in aside.iterdir():
        _remove(Path(run_dir) / path.name)
        os.replace(path, Path(run_dir) / path.name)
    aside.rmdir()
    return True


def remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run directory before a config is checked: a refused command leaves no
    empty directory behind."""
    with contextlib.suppress(OSError):
        Path(run_dir).rmdir()
