"""CIFAR-10 / CIFAR-100 in the official "python version" pickle layout, with safe download.

Layout (exactly what the official archives extract to)::

    root/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    root/cifar-100-python/train, test, meta

Each batch is a pickle (load with ``encoding="bytes"``) of a dict with ``b"data"``: an
N x 3072 uint8 array whose rows are the R, then G, then B 32 x 32 planes in row-major order,
and ``b"labels"`` (CIFAR-10) or ``b"fine_labels"`` (CIFAR-100).
"""

from __future__ import annotations

import logging
import os
import pickle
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twolevel_dist.data.arrays import ImageArrays
from twolevel_dist.data.safe_tar import file_hexdigest, safe_extract_tar
from twolevel_dist.errors import DataError
from twolevel_dist.progress import Progress

log = logging.getLogger(__name__)

CIFAR_IMAGE_SIZE = 32
_PIXELS_PER_IMAGE = 3 * CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE
_DOWNLOAD_HINT = (
    "set dataset.download=true (load_cifar(..., download=True)) to fetch the official archive, "
    "or extract it yourself into the root"
)


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives on disk and online."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    url: str
    archive_name: str
    md5: str


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        name="cifar10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_file="test_batch",
        meta_file="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive_name="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": CifarSpec(
        name="cifar100",
        folder="cifar-100-python",
        train_files=("train",),
        test_file="test",
        meta_file="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive_name="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def load_cifar(
    root: str | os.PathLike[str], name: str = "cifar10", download: bool = False
) -> tuple[ImageArrays, ImageArrays]:
    """(train, test) CIFAR-10 or CIFAR-100 read from the official pickles under ``root``."""
    spec = _spec(name)
    root = Path(root).expanduser()
    if download and _missing_files(root, spec):
        download_cifar(root, spec.name)
    missing = _missing_files(root, spec)
    if missing:
        raise DataError(
            f"{spec.name}: missing {', '.join(str(p) for p in missing)}. "
            f"Expected the official layout {_layout(root, spec)}; {_DOWNLOAD_HINT}."
        )
    classes = _read_class_names(root, spec)
    train = _read_split(root, spec, spec.train_files, classes)
    test = _read_split(root, spec, (spec.test_file,), classes)
    return train, test


def download_cifar(root: str | os.PathLike[str], name: str = "cifar10") -> Path:
    """Fetch the official archive into ``root`` (unless there already), verify and extract it.

    Returns the extracted data folder. An archive already present is re-used, so a failed
    extraction can be retried offline; a corrupt one is reported (delete it and retry).
    """
    spec = _spec(name)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    archive = root / spec.archive_name
    if not archive.exists():
        _fetch_url(spec.url, archive)
    verify_and_extract(archive, root, spec.md5)
    return root / spec.folder


def _fetch_url(url: str, destination: Path) -> None:
    """Download ``url`` to ``destination`` atomically (a partial file never has the final name).

    Kept separate so tests replace it (the network is never used in tests).
    """
    partial = destination.with_name(destination.name + ".partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0)
            progress = Progress(log, f"downloading {url} to {destination}", size >> 20,
                                unit="MB")
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                progress.update(out.tell() >> 20)
        os.replace(partial, destination)
        progress.finish()
    except OSError as error:  # URLError is an OSError
        partial.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url} to {destination}: {error}. Check the network, or download "
            f"the file by hand and place it at {destination}."
        ) from error


def verify_and_extract(
    archive_path: str | os.PathLike[str], root: str | os.PathLike[str], md5: str
) -> None:
    """Check ``archive_path`` against ``md5``, then safely extract it (a .tar.gz) into ``root``.

    Nothing is extracted from an archive with the wrong checksum, and extraction is all or
    nothing (see :func:`safe_extract_tar`).
    """
    archive_path = Path(archive_path)
    if not archive_path.is_file():
        raise DataError(f"archive {archive_path} does not exist; download it first.")
    log.info(f"checking the md5 of {archive_path} and extracting it into {root}")
    actual = file_hexdigest(archive_path, "md5")
    if actual != md5.lower():
        raise DataError(
            f"checksum mismatch for {archive_path}: expected md5 {md5.lower()}, got {actual}. "
            "The file is corrupt or incomplete; delete it and retry the download."
        )
    safe_extract_tar(archive_path, root)


def _spec(name: str) -> CifarSpec:
    spec = CIFAR_SPECS.get(name)
    if spec is None:
        raise DataError(f"unknown CIFAR variant {name!r}; use one of {sorted(CIFAR_SPECS)}.")
    return spec


def _layout(root: Path, spec: CifarSpec) -> str:
    files = ", ".join((*spec.train_files, spec.test_file, spec.meta_file))
    return f"{root / spec.folder}/{{{files}}}"


def _missing_files(root: Path, spec: CifarSpec) -> list[Path]:
    folder = root / spec.folder
    names = (*spec.train_files, spec.test_file, spec.meta_file)
    return [folder / n for n in names if not (folder / n).is_file()]


# Everything the official CIFAR pickles hold beyond dicts, lists, strings, bytes and numbers: numpy
# arrays (rebuilt by these functions, under numpy 1's and numpy 2's module names) and the bytes
# decoder that Python 3's protocol-2 pickles use. A pickle can name any importable callable and
# run it while loading; these are the only ones a CIFAR file may name.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what the CIFAR format holds and refuses any other global,
    so a doctored file cannot run code while it is read."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which no CIFAR pickle holds (refused: loading it "
                f"could run code)"
            )
        return super().find_class(module, name)


def _load_pickle(path: Path, spec: CifarSpec) -> dict:
    try:
        with open(path, "rb") as f:
            content = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as error:  # unpickling raises many types (UnpicklingError, EOFError, ...)
        raise DataError(
            f"{spec.name}: cannot read {path} as a CIFAR pickle ({type(error).__name__}: {error}). "
            f"The file is corrupt; delete {path.parent} and {_DOWNLOAD_HINT}."
        ) from error
    if not isinstance(content, dict):
        raise DataError(
            f"{spec.name}: {path} holds a {type(content).__name__}, expected the official CIFAR "
            "dict; "
            f"delete {path.parent} and {_DOWNLOAD_HINT}."
        )
    return content


def _read_class_names(root: Path, spec: CifarSpec) -> list[str]:
    path = root / spec.folder / spec.meta_file
    meta = _load_pickle(path, spec)
    names = meta.get(spec.names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise DataError(
            f"{spec.name}: {path} has no {spec.names_key!r} list of class names; "
            f"expected the official meta file. Delete {path.parent} and {_DOWNLOAD_HINT}."
        )
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read_split(
    root: Path, spec: CifarSpec, files: tuple[str, ...], classes: list[str]
) -> ImageArrays:
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for file_name in files:
        path = root / spec.folder / file_name
        batch = _load_pickle(path, spec)
        data, batch_labels = _check_batch(path, spec, batch, len(classes))
        images.append(data)
        labels.append(batch_labels)
    # Rows are R, G, B planes of 32 x 32, row-major: a plain reshape gives [N, 3, 32, 32].
    stacked = np.concatenate(images).reshape(-1, 3, CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE)
    return ImageArrays(
        images=torch.from_numpy(np.ascontiguousarray(stacked)),
        labels=torch.from_numpy(np.concatenate(labels)),
        classes=list(classes),
    )


def _check_batch(
    path: Path, spec: CifarSpec, batch: dict, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    fix = f"delete {path.parent} and {_DOWNLOAD_HINT}"
    if b"data" not in batch or spec.label_key not in batch:
        raise DataError(
            f"{spec.name}: {path} lacks the keys b'data' and {spec.label_key!r} of the official "
            f"format (found {sorted(batch)}); {fix}."
        )
    data = batch[b"data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != _PIXELS_PER_IMAGE)
    ):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(
            f"{spec.name}: {path} b'data' must be a uint8 array of shape [N, {_PIXELS_PER_IMAGE}] "
            f"(R, G, B planes of 32x32), got {dtype} of shape {shape}; {fix}."
        )
    labels = np.asarray(batch[spec.label_key])
    if (
        labels.ndim != 1
        or labels.shape[0] != data.shape[0]
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DataError(
            f"{spec.name}: {path} has {data.shape[0]} images but {spec.label_key!r} is "
            f"{labels.dtype} of shape {list(labels.shape)}; expected {data.shape[0]} integer "
            f"labels; {fix}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{spec.name}: {path} has labels in [{labels.min()}, {labels.max()}] but the meta file "
            f"names {num_classes} classes; {fix}."
        )
    return data, labels.astype(np.int64)
