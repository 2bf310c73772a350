"""Checkpoints, one file per gp rank, written atomically, loaded with ``weights_only=True``.

Layout under the run directory:
    checkpoints/epoch_0003/rank00000.pt ...    at the end of epoch 3: gp rank g's shard,
                                               optimizer and the RNG states of its dp replicas
    checkpoints/epoch_0003_step_000000500/     during epoch 4, after global step 500
    checkpoints/<either>/COMPLETE              written by rank 0 after every file is written
Data-parallel replicas hold the same shard, so only replica 0 writes (its rank is the gp rank);
every replica reads them, whatever the number of replicas. A checkpoint without COMPLETE (a job
killed while writing) is never "latest".
"""

import errno
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

from twolevel_dist.errors import ConfigError, RunError

COMPLETE = "COMPLETE"
_CHECKPOINT_DIR = re.compile(r"^epoch_(\d+)(?:_step_(\d+))?$")


class Position(NamedTuple):
    """Where a checkpoint was taken: after ``epochs`` complete epochs and, for one taken inside
    the next epoch, at global ``step`` (0: at the epoch's end). Ordered as the run went."""

    epochs: int
    step: int = 0

    @property
    def name(self) -> str:
        return f"epoch_{self.epochs:04d}" + (f"_step_{self.step:09d}" if self.step else "")


def _position(at) -> Position:
    return at if isinstance(at, Position) else Position(int(at))


def atomic_save(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path``, durably and all or nothing (``_write_durably``); a full
    disk is reported as such."""
    try:
        _write_durably(Path(path), "wb", lambda f: torch.save(obj, f))
    except BaseException as error:
        if _disk_full(error):
            raise RunError(f"no space left on the device of {path.parent} while writing "
                           f"{path.name}; free space there (or set run_dir to a larger disk) "
                           f"and resume=true from the last complete checkpoint") from None
        raise


def _write_durably(path: Path, mode: str, write) -> None:
    """``write(file)`` into a temporary file in ``path``'s folder, fsynced, renamed over
    ``path``, then the folder fsynced so that the rename survives a crash of the machine too.
    On any failure the temporary file is removed (a full disk stays no fuller) and ``path`` is
    left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    except OSError:         # some file systems refuse to sync a folder (EINVAL): the rename stands
        pass
    finally:
        os.close(folder)


def _disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` comes from a full disk: the OS says ENOSPC, which torch.save may wrap
    in a RuntimeError of its own (the OSError then is its context)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def load_failure(error: Exception) -> str:
    """Why ``torch.load`` failed, in one line of our own: torch's text advises loading with
    ``weights_only=False``, which would run whatever code the file holds."""
    text = str(error)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        return (f"it holds pickled Python objects{f' ({found.group(1)})' if found else ''}, "
                f"not only tensors: a whole module saved with torch.save(model)? Save its "
                f"state_dict instead")
    if "zip archive" in text:
        return "a damaged or truncated torch file"
    first = re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines()[0][:200] if text else ""
    return f"not a file torch.save wrote: {type(error).__name__}: {first}"


def epoch_dir(run_dir: Path, at) -> Path:
    """The folder of the checkpoint at ``at``: a Position, or an epoch number (its end)."""
    return Path(run_dir) / "checkpoints" / _position(at).name


def rank_file(run_dir: Path, at, gp_rank: int) -> Path:
    return epoch_dir(run_dir, at) / f"rank{gp_rank:05d}.pt"


def mark_complete(run_dir: Path, at) -> None:
    """The marker, as durable as the rank files are."""
    _write_durably(epoch_dir(run_dir, at) / COMPLETE, "w",
                   lambda f: f.write(f"{_position(at).name}\n"))


def _positions(run_dir: Path, complete: bool) -> list[Position]:
    root = Path(run_dir) / "checkpoints"
    found = [Position(int(m.group(1)), int(m.group(2) or 0))
             for d in (root.iterdir() if root.is_dir() else [])
             if (m := _CHECKPOINT_DIR.match(d.name)) and (d / COMPLETE).is_file() == complete]
    return sorted(found, reverse=True)


def complete_checkpoints(run_dir: Path) -> list[Position]:
    """Every complete checkpoint, epoch ends and inside epochs alike, newest first."""
    return _positions(run_dir, complete=True)


def latest_complete(run_dir: Path) -> Position | None:
    positions = complete_checkpoints(run_dir)
    return positions[0] if positions else None


def complete_epochs(run_dir: Path) -> list[int]:
    """Epochs with a complete end-of-epoch checkpoint, newest first."""
    return [p.epochs for p in complete_checkpoints(run_dir) if not p.step]


def prune(run_dir: Path, keep: int | None) -> list[int]:
    """Delete all but the newest ``keep`` complete checkpoints, and the incomplete ones older
    than the newest complete one (left by a job killed while writing); None keeps everything.
    Called after a new checkpoint is marked complete, so a kill during the deletion never
    leaves fewer than ``keep`` loadable. Returns the positions deleted."""
    if keep is None:
        return []
    complete = complete_checkpoints(run_dir)
    if not complete:
        return []
    doomed = complete[keep:] + [p for p in _positions(run_dir, complete=False)
                                if p < complete[0]]
    for position in sorted(doomed):
        shutil.rmtree(epoch_dir(run_dir, position), ignore_errors=True)
    return sorted(doomed)


def latest_complete_epoch(run_dir: Path) -> int | None:
    epochs = complete_epochs(run_dir)
    return epochs[0] if epochs else None


class DamagedCheckpoint(ConfigError):
    """A rank's file of a checkpoint marked complete is missing or unreadable."""


def load_rank_checkpoint(run_dir: Path, at, gp_rank: int, expected_meta: dict) -> dict:
    path = rank_file(run_dir, at, gp_rank)
    if not path.is_file():
        raise DamagedCheckpoint(
            f"checkpoint {path} is missing although {_position(at).name} is marked complete "
            f"(deleted, or the run had fewer ranks per model); resume with the run's groups")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:     # truncated, overwritten, foreign: say which file, not a trace
        raise DamagedCheckpoint(f"checkpoint {path} is unreadable ({load_failure(error)})") \
            from None
    if not isinstance(state, dict) or "model" not in state:
        raise DamagedCheckpoint(f"checkpoint {path} holds no twolevel_dist rank state")
    check_meta(state.get("meta", {}), expected_meta, path)
    return state


def load_newest_readable(run_dir: Path, gp_rank: int, expected_meta: dict, agree,
                         set_aside: bool = False):
    """(position, this gp rank's state, notes) of the newest complete checkpoint that loads on
    every rank. ``agree(problem)`` gathers each rank's problem (None: loaded) so all ranks fall
    back together; a checkpoint of another model or layout is refused outright, not skipped.
    Every rank tries the checkpoints rank 0 lists: a shared file system may show a node a stale
    listing, and ranks resuming from different checkpoints would mix their shards.
    With ``set_aside`` (one rank), the complete checkpoints skipped are renamed
    ``<name>.damaged``: left in place, pruning would count them as the newest and delete the
    good ones written after the resume, and the training would write into them again."""
    notes, skipped = [], []
    for position in agree(complete_checkpoints(run_dir))[0]:
        try:
            state = load_rank_checkpoint(run_dir, position, gp_rank, expected_meta)
            problem = None
        except DamagedCheckpoint as error:
            state, problem = None, str(error)
        problems = [p for p in agree(problem) if p is not None]
        if not problems:
            if set_aside:
                for damaged in skipped:
                    _set_aside(epoch_dir(run_dir, damaged))
            return position, state, notes
        label = f"epoch {position.epochs}" if not position.step else position.name
        notes.append(f"skipped {label}: {problems[0]}"
                     + (f" (set aside as {position.name}.damaged)" if set_aside else ""))
        skipped.append(position)
    raise ConfigError(f"resume: no complete checkpoint under {Path(run_dir) / 'checkpoints'} "
                      f"loads on every rank ({'; '.join(notes) or 'there is none'}); start "
                      f"without resume=true (with overwrite=true to replace the run)")


def _set_aside(folder: Path) -> None:
    """Rename ``folder`` to ``<name>.damaged`` (``.damaged.2``, ... where taken)."""
    target, n = folder.with_name(f"{folder.name}.damaged"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged.{n}")
    os.replace(folder, target)


def check_meta(found: dict, expected: dict, path) -> None:
    """Refuse a checkpoint written for another model, convolution kind or group layout."""
    diffs = [f"{k}: checkpoint has {found.get(k)!r}, this run has {v!r}"
             for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise ConfigError(f"checkpoint {path} does not fit this run ({'; '.join(diffs)}); "
                          f"resume with the same model, conv and groups (the data-parallel "
                          f"replicas may change), or start a new run_dir")
