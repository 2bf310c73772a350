"""Archives: all-or-nothing, path-safe extraction of .tar / .tar.gz files, and their digests.

A crafted archive can write outside the destination through absolute member names, '..'
components or links; all of these are rejected before anything is written. Members are
extracted into a hidden staging folder inside the destination first and only then moved
into place, so an error (corrupt archive, full disk) never leaves a half-extracted tree
under the final names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from twolevel_dist.errors import DataError


def file_hexdigest(path: str | os.PathLike[str], algorithm: str) -> str:
    """The hex digest of a file's bytes (``algorithm``: "md5", "sha256"), read 1 MiB at a time
    (hashlib.file_digest needs Python 3.11; 3.10 is supported)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def safe_extract_tar(
    archive: str | os.PathLike[str], destination: str | os.PathLike[str]
) -> list[Path]:
    """Extract ``archive`` into ``destination``; returns the top-level paths it created.

    A top-level entry that already exists in ``destination`` is replaced by the archive's
    version (extracting means "make destination hold what the archive holds").
    """
    archive = Path(archive)
    destination = Path(destination)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist; check the path.")
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=destination))
    try:
        top_level = _extract_checked(archive, staging)
        placed = []
        for name in sorted(top_level):
            target = destination / name
            _remove(target)
            os.replace(staging / name, target)
            placed.append(target)
        return placed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_checked(archive: Path, staging: Path) -> set[str]:
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            if hasattr(tarfile, "data_filter"):
                # Defence in depth on Pythons that have it: the stdlib's own safety filter.
                tar.extractall(staging, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4 only
                tar.extractall(staging, members=members)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(
            f"cannot extract {archive}: {type(error).__name__}: {error}. The archive is corrupt "
            "or incomplete (or the disk is full); delete it and download it again."
        ) from error
    top_level = {PurePosixPath(m.name).parts[0] for m in members if PurePosixPath(m.name).parts}
    top_level.discard(".")
    return top_level


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if (
        member.name.startswith(("/", "\\"))
        or path.is_absolute()
        or (len(member.name) > 1 and member.name[1] == ":")
    ):
        raise DataError(
            f"refusing to extract {archive}: member {member.name!r} has an absolute path, which "
            "would write outside the destination. Use a trusted archive."
        )
    if ".." in path.parts or ".." in PurePosixPath(member.name.replace("\\", "/")).parts:
        raise DataError(
            f"refusing to extract {archive}: member {member.name!r} contains '..', which would "
            "write outside the destination. Use a trusted archive."
        )
    if not (member.isfile() or member.isdir()):
        raise DataError(
            f"refusing to extract {archive}: member {member.name!r} is a link or special file; "
            "only regular files and folders are allowed. Use a trusted archive."
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
