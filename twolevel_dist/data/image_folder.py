"""Small image-folder data sets, decoded once with Pillow and cached as uint8 arrays.

Layout::

    root/train/<class>/<image>     class names = sorted folder names under train/
    root/test/<class>/<image>      (or root/val/<class>/<image> when there is no test/)

``root`` may also be a .tar / .tar.gz / .tgz archive of that layout: it is extracted once
into a cache folder named by its content (a copy of it elsewhere reuses the extraction;
the digest is remembered by path, size and mtime, so a later start does not read it again).
Decoded arrays are cached in an .npz keyed by the file list, sizes, mtimes and ``image_size``,
so editing the folder invalidates the cache automatically.

Where the caches go: ``cache_dir`` (``dataset.cache_dir``), else ``$TWOLEVEL_CACHE``, for both;
with neither, decoded arrays go to ``root/.twolevel_cache`` where ``root`` is writable and to
``~/.cache/twolevel_dist`` (``$XDG_CACHE_HOME/twolevel_dist``) otherwise, and archives are
extracted to ``~/.cache/twolevel_dist/extracted`` (their arrays then cached inside that copy).
Extracting and decoding log their progress; a start that reads the cache says so, and where.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twolevel_dist.data import decode
from twolevel_dist.data.arrays import ImageArrays
from twolevel_dist.data.safe_tar import file_hexdigest, safe_extract_tar
from twolevel_dist.errors import DataError
from twolevel_dist.progress import Progress, duration

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_CACHE_FORMAT_VERSION = 1
_LAYOUT = "root/train/<class>/<image> and root/test/<class>/<image> (or root/val/<class>/<image>)"
PROGRESS_EVERY_S = 10.0
CACHE_ENV = "TWOLEVEL_CACHE"
# Below this many images a process pool costs more (start-up, pickling) than it saves.
_MIN_IMAGES_FOR_POOL = 2048
_IMAGES_PER_TASK = 1024


@dataclass(frozen=True)
class _SplitFiles:
    """The image files of one split: paths relative to root, with their class index."""

    name: str
    relative_paths: list[str]
    labels: list[int]


def load_image_folder(
    root: str | os.PathLike[str],
    image_size: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    use_cache: bool = True,
    workers: int | None = None,
) -> tuple[ImageArrays, ImageArrays]:
    """(train, test) ImageArrays from an image folder (or an archive of one)."""
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1
    ):
        raise DataError(f"image_size must be a positive int or None, got {image_size!r}.")
    root = Path(root).expanduser()
    if root.is_file() and root.name.endswith(ARCHIVE_SUFFIXES):
        root = _extracted_archive(root, cache_dir)
    # The times logged count from here: listing the files and keying the cache by their sizes
    # and dates takes seconds for CIFAR-10's 60,000 files.
    started = time.monotonic()
    train_dir, test_dir = find_split_dirs(root)
    classes = list_classes(train_dir)
    train_files = _list_split(root, train_dir, classes)
    test_files = _list_split(root, test_dir, classes, reference=train_dir)

    key = cache_key(root, (train_files, test_files), image_size)
    cache_path = None
    if use_cache:
        folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(root)
        cache_path = folder / _cache_file_name(root, image_size, key)
        cached = _read_cache(cache_path, key, classes)
        if cached is not None:
            log.info(f"read {len(cached[0]) + len(cached[1]):,} decoded images of {root} from "
                     f"the cache {cache_path} ({cache_path.stat().st_size / 2**20:,.0f} MB) in "
                     f"{duration(time.monotonic() - started)}")
            return cached

    all_paths = [str(root / p) for p in train_files.relative_paths + test_files.relative_paths]
    num_train = len(train_files.relative_paths)
    where = f"into the cache {cache_path}" if cache_path is not None else "(no cache)"
    progress = Progress(log, f"decoding {len(all_paths):,} images of {root} ({num_train:,} "
                             f"train, {len(all_paths) - num_train:,} test) {where}",
                        len(all_paths), unit="images", every_s=PROGRESS_EVERY_S,
                        started=started)
    images = decode_all(all_paths, image_size, workers=workers, progress=progress)
    train = ImageArrays(
        torch.from_numpy(images[:num_train]),
        torch.tensor(train_files.labels, dtype=torch.int64),
        list(classes),
    )
    test = ImageArrays(
        torch.from_numpy(images[num_train:]),
        torch.tensor(test_files.labels, dtype=torch.int64),
        list(classes),
    )
    if cache_path is not None and _write_cache(cache_path, key, train, test):
        progress.finish(f" ({cache_path.stat().st_size / 2**20:,.0f} MB written)")
    else:
        progress.finish()
    return train, test


def extract_tar(archive: str | os.PathLike[str], destination: str | os.PathLike[str]) -> Path:
    """Safely extract a .tar(.gz) image-folder archive into ``destination``; returns it."""
    safe_extract_tar(archive, destination)
    return Path(destination)


# ---------------------------------------------------------------------------- layout


def find_split_dirs(root: Path) -> tuple[Path, Path]:
    if not root.is_dir():
        raise DataError(
            f"image folder root {root} does not exist or is not a folder; expected {_LAYOUT}."
        )
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"image folder {root} has no train/ folder; expected {_LAYOUT}.")
    for name in ("test", "val"):
        if (root / name).is_dir():
            return train_dir, root / name
    raise DataError(f"image folder {root} has neither test/ nor val/ folder; expected {_LAYOUT}.")


def list_classes(train_dir: Path) -> list[str]:
    """Sorted class-folder names; hidden folders (.cache, .ipynb_checkpoints) are not classes."""
    classes = sorted(
        e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith(".")
    )
    if not classes:
        raise DataError(
            f"{train_dir} has no class folders; put each class's images in its own folder, "
            f"i.e. {_LAYOUT}."
        )
    return classes


def _list_split(
    root: Path, split_dir: Path, classes: list[str], reference: Path | None = None
) -> _SplitFiles:
    if reference is not None:
        found = sorted(
            e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
        )
        if found != classes:
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise DataError(
                f"{split_dir} must have the same class folders as {reference}: missing {missing}, "
                f"unexpected {extra}. Add or rename folders so both splits list the same classes."
            )
    relative_paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = image_files(split_dir / name)
        if not files:
            raise DataError(
                f"class folder {split_dir / name} has no images (accepted extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder from every split."
            )
        relative_paths.extend(str(f.relative_to(root)) for f in files)
        labels.extend([label] * len(files))
    return _SplitFiles(split_dir.name, relative_paths, labels)


def image_files(class_dir: Path) -> list[Path]:
    """Image files under ``class_dir`` (recursively, skipping hidden entries), sorted."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(class_dir):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found.extend(
            Path(folder) / f
            for f in files
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return sorted(found)


# ---------------------------------------------------------------------------- decoding


def decode_all(
    paths: list[str],
    image_size: int | None,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """All ``paths`` decoded into one uint8 ``[N, 3, H, W]`` array, in order.

    Uses a process pool for large sets (Pillow decoding is CPU bound and holds the GIL for
    small images), and decodes in this process for small ones. ``progress`` hears of every
    decoded chunk.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}.")
    chunks = [paths[i : i + _IMAGES_PER_TASK] for i in range(0, len(paths), _IMAGES_PER_TASK)]
    parts: list[np.ndarray] = []

    def decoded(part: np.ndarray) -> None:
        parts.append(part)
        if progress is not None:
            progress.update(sum(len(p) for p in parts))

    if workers == 1 or len(paths) < _MIN_IMAGES_FOR_POOL:
        for chunk in chunks:
            decoded(decode.decode_chunk(chunk, image_size))
    else:
        # fork (where available) starts workers instantly and shares the parent's imports.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(workers, len(chunks)), mp_context=multiprocessing.get_context(method)
        ) as pool:
            for part in pool.map(decode.decode_chunk, chunks, [image_size] * len(chunks)):
                decoded(part)
    for chunk, part in zip(chunks, parts):
        if part.shape[1:] != parts[0].shape[1:]:
            raise decode.mixed_size_error(
                chunks[0][0], parts[0].shape[1:], chunk[0], part.shape[1:]
            )
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


# ---------------------------------------------------------------------------- cache


def cache_key(root: Path, splits: tuple[_SplitFiles, ...], image_size: int | None) -> str:
    """Hash of everything the decoded arrays depend on; any file change gives a new key."""
    digest = hashlib.sha256()
    digest.update(json.dumps([_CACHE_FORMAT_VERSION, str(root.resolve()), image_size]).encode())
    for split in splits:
        for relative, label in zip(split.relative_paths, split.labels):
            stat = os.stat(root / relative)
            digest.update(
                f"{split.name}\0{relative}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()


def default_cache_dir(root: Path) -> Path:
    """``$TWOLEVEL_CACHE`` where set; else ``root/.twolevel_cache`` when root is writable, else
    ``$XDG_CACHE_HOME/twolevel_dist`` (``~/.cache/twolevel_dist``), e.g. for a read-only shared
    data folder."""
    if os.environ.get(CACHE_ENV):
        return user_cache_dir()
    local = root / ".twolevel_cache"
    if _is_writable_dir(local):
        return local
    return user_cache_dir()


def user_cache_dir() -> Path:
    """``$TWOLEVEL_CACHE``, else ``$XDG_CACHE_HOME/twolevel_dist`` (``~/.cache/twolevel_dist``):
    the project's one cache folder (``launch/gpu_image_env.sh`` uses it too)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "twolevel_dist"


def _is_writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return True
    except OSError:
        return False


def _cache_file_name(root: Path, image_size: int | None, key: str) -> str:
    # The root-path hash keeps folders that share a name apart in the shared user cache.
    root_tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    size_tag = "native" if image_size is None else f"{image_size}px"
    return f"{root.name}-{root_tag}-{size_tag}-{key[:16]}.npz"


def _read_cache(path: Path, key: str, classes: list[str]) -> tuple[ImageArrays, ImageArrays] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key or stored["classes"].tolist() != classes:
                return None
            train = ImageArrays(
                torch.from_numpy(stored["train_images"]),
                torch.from_numpy(stored["train_labels"]),
                list(classes),
            )
            test = ImageArrays(
                torch.from_numpy(stored["test_images"]),
                torch.from_numpy(stored["test_labels"]),
                list(classes),
            )
    except Exception as error:  # a damaged cache is only a lost speed-up: decode again
        warnings.warn(
            f"ignoring unreadable image cache {path} ({type(error).__name__}: {error}); "
            "re-decoding."
        )
        return None
    return train, test


def _write_cache(path: Path, key: str, train: ImageArrays, test: ImageArrays) -> bool:
    """Atomic write (temp file + os.replace), then drop stale caches of the same folder;
    whether it was written."""
    try:
        _write_atomically(path, "wb", lambda f: np.savez(
            f,
            key=np.array(key),
            classes=np.array(train.classes),
            train_images=train.images.numpy(),
            train_labels=train.labels.numpy(),
            test_images=test.images.numpy(),
            test_labels=test.labels.numpy(),
        ))
    except OSError as error:  # an unwritable cache must not stop training
        warnings.warn(
            f"could not write image cache {path} ({error}); the folder will be decoded again next "
            "time."
        )
        return False
    # Same folder and image_size, older key: that cache can never be hit again.
    stale_prefix = path.name[: -len(".npz") - 16]
    for other in path.parent.iterdir():
        if other != path and other.name.startswith(stale_prefix) and other.name.endswith(".npz"):
            other.unlink(missing_ok=True)
    return True


def _extracted_archive(archive: Path, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Extract an image-folder archive once into the cache; later calls reuse the folder.

    The copy is named by the archive's content, not its path or mtime: an archive staged anew
    for each job (copied to node-local disk, provisioned again) finds the copy its first
    extraction made instead of adding another; a changed archive gets a new one."""
    base = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir()
    tag = _archive_sha256(archive, base / "archive-digests")[:16]
    stem = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    folder = base / "extracted" / f"{stem}-{tag}"
    complete_marker = folder / ".complete"
    if complete_marker.is_file():
        log.info(f"{archive}: using its extracted copy {folder}")
    else:
        progress = Progress(log, f"extracting {archive} into {folder} (once: later starts reuse "
                                 f"it)", 1)
        safe_extract_tar(archive, folder)
        complete_marker.touch()
        progress.finish()
    return folder


def _archive_sha256(archive: Path, memo_dir: Path) -> str:
    """The archive's sha256, remembered under ``memo_dir`` by its path, size and mtime.

    Hashing reads the whole archive; remembering the digest spares that read to every later
    start (each rank of each job) that finds the archive where and as it was. An archive
    staged anew has a new mtime, so it is hashed once more and finds the same extracted copy.
    A cache that cannot be written only costs the read again."""
    stat = archive.stat()
    identity = f"{archive.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    memo = memo_dir / hashlib.sha256(identity.encode()).hexdigest()[:32]
    try:
        remembered = memo.read_text().strip()
        if len(remembered) == 64 and all(c in "0123456789abcdef" for c in remembered):
            return remembered
    except OSError:
        pass
    hexdigest = file_hexdigest(archive, "sha256")
    try:   # written aside and renamed: ranks starting together never read half a digest
        _write_atomically(memo, "w", lambda f: f.write(hexdigest))
    except OSError:
        pass
    return hexdigest


def _write_atomically(path: Path, mode: str, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, then renamed over it: a reader
    sees the old file or the whole new one. The temporary file is removed on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, mode) as file:
            write(file)
        os.chmod(temp_name, 0o644)  # mkstemp makes it owner-only; others may share the cache
        os.replace(temp_name, path)
    except BaseException:
        os.unlink(temp_name)
        raise
