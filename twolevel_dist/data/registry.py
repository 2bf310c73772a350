"""One entry point, ``load_arrays(name, ...)``, for every in-memory data set.

In-memory (ImageArrays + DeviceLoader): synthetic, cifar10, cifar100, imagefolder.
Streaming (DataLoader from make_streaming_loader): imagenet.
"""

from __future__ import annotations

import os

from twolevel_dist.data.arrays import ImageArrays
from twolevel_dist.data.cifar import CIFAR_IMAGE_SIZE, load_cifar
from twolevel_dist.data.image_folder import load_image_folder
from twolevel_dist.data.synthetic import DEFAULT_TEST_SIZE, DEFAULT_TRAIN_SIZE, make_synthetic
from twolevel_dist.errors import DataError

IN_MEMORY_DATASETS = ("synthetic", "cifar10", "cifar100", "imagefolder")
STREAMING_DATASETS = ("imagenet",)


def is_streaming(name: str) -> bool:
    """True for data sets too large for memory (use make_streaming_loader), False for the
    in-memory ones; unknown names raise DataError listing the valid names."""
    return _normalise_name(name) in STREAMING_DATASETS


def load_arrays(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    seed: int = 0,
    image_size: int | None = None,
    synthetic_train_size: int = DEFAULT_TRAIN_SIZE,
    synthetic_test_size: int = DEFAULT_TEST_SIZE,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[ImageArrays, ImageArrays]:
    """(train, test) for an in-memory data set.

    ``num_classes``: for synthetic, how many classes to generate (default 10); for the others,
    a consistency check against the data (a mismatch with the model config fails early here
    rather than as a confusing loss error later). ``seed`` only affects synthetic data.
    """
    name = _normalise_name(name)
    if name in STREAMING_DATASETS:
        raise DataError(
            f"{name!r} is a streaming data set that does not fit in memory; build it with "
            "make_streaming_loader(...) instead of load_arrays (check is_streaming(name) first)."
        )
    if name == "synthetic":
        train, test = make_synthetic(
            num_classes=10 if num_classes is None else num_classes,
            train_size=synthetic_train_size,
            test_size=synthetic_test_size,
            image_size=32 if image_size is None else image_size,
            seed=seed,
        )
        return train, test

    if root is None:
        raise DataError(
            f"data set {name!r} needs a root folder; set dataset.root (load_arrays(..., "
            "root=PATH))."
        )
    if name in ("cifar10", "cifar100"):
        if image_size not in (None, CIFAR_IMAGE_SIZE):
            raise DataError(
                f"{name} images are {CIFAR_IMAGE_SIZE}x{CIFAR_IMAGE_SIZE}; got "
                f"image_size={image_size}. "
                f"Set dataset.image_size to null or {CIFAR_IMAGE_SIZE}."
            )
        train, test = load_cifar(root, name=name, download=download)
    else:
        if download:
            raise DataError(
                "imagefolder data sets cannot be downloaded; set dataset.download=false and point "
                "dataset.root at the folder (or a .tar.gz of it)."
            )
        train, test = load_image_folder(root, image_size=image_size, cache_dir=cache_dir)

    if num_classes is not None and num_classes != train.num_classes:
        raise DataError(
            f"data set {name!r} at {root} has {train.num_classes} classes but "
            f"num_classes={num_classes} "
            f"was requested; set num_classes to {train.num_classes} (or null to take it from the "
            "data)."
        )
    return train, test


def _normalise_name(name: str) -> str:
    valid = IN_MEMORY_DATASETS + STREAMING_DATASETS
    if not isinstance(name, str) or name.strip().lower() not in valid:
        raise DataError(f"unknown data set {name!r}; valid names are {', '.join(valid)}.")
    return name.strip().lower()
