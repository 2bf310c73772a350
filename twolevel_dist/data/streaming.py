"""ImageNet-size image folders that do not fit in memory: a DataLoader decoding in workers.

``root/<split>/<class>/<image>`` is listed once; worker processes (persistent across epochs)
decode with Pillow and augment per sample, handing over uint8 images that are normalised on the
device:

* train: random-resized-crop (scale (0.08, 1), ratio (3/4, 4/3)) to ``image_size`` + flip;
* eval: resize the short side to ``round(image_size * 256 / 224)``, centre-crop ``image_size``.

The crop/flip *parameters* always come from this module, drawn from a generator seeded by
(seed, epoch, sample index): ranks with the same dp_rank see identical augmented images
whatever the worker count. The pixel operations use torchvision where ``import torchvision``
works (faster, antialiased tensor kernels) and plain Pillow/numpy otherwise; the CPU path
never imports torchvision successfully, so the Pillow branch is the tested default here.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from twolevel_dist.data.image_folder import IMAGE_EXTENSIONS, image_files, list_classes
from twolevel_dist.data.seeding import derive_seed, make_generator
from twolevel_dist.errors import DataError
from twolevel_dist.validate import positive_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVAL_RESIZE_RATIO = 256.0 / 224.0
_BILINEAR = getattr(getattr(Image, "Resampling", Image), "BILINEAR")
_FLIP = getattr(getattr(Image, "Transpose", Image), "FLIP_LEFT_RIGHT")

Backend = Literal["auto", "pil", "torchvision"]


def load_torchvision_functional() -> ModuleType | None:
    """``torchvision.transforms.functional`` where torchvision imports, else None.

    Any exception counts as "unavailable": a torchvision wheel built for another torch fails
    with RuntimeError/OSError rather than ImportError. Where it is not installed at all we
    do not even attempt the import.
    """
    try:
        if importlib.util.find_spec("torchvision") is None:
            return None
        from torchvision.transforms import functional
    except Exception:
        return None
    return functional


class ShardedSampler(Sampler[int]):
    """Per-epoch permutation seeded by (seed, epoch), identical on every rank; replica
    ``dp_rank`` takes ``perm[dp_rank::dp_size]`` (train: truncated to equal length)."""

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        dp_rank: int,
        dp_size: int,
        skip: int = 0,
        part: int = 0,
        parts: int = 1,
        batch_size: int = 1,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise DataError(
                f"dp_rank must be in [0, {dp_size - 1}] with dp_size >= 1, got dp_rank={dp_rank}, "
                f"dp_size={dp_size}."
            )
        self.total = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = epoch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.skip = skip  # the first samples of the epoch, already trained on (a resumed epoch)
        # Only part ``part`` of ``parts`` equal slices of each full batch of ``batch_size``: the gp
        # ranks of a model decode one slice each and gather the batch (``StreamingEpochLoader``).
        self.part, self.parts, self.batch_size = part, parts, batch_size
        self.length = (
            num_samples // dp_size if shuffle else len(range(dp_rank, num_samples, dp_size))
        )
        if self.length == 0:
            raise DataError(
                f"data-parallel shard {dp_rank} of {dp_size} is empty ({num_samples} samples); "
                "use fewer data-parallel replicas."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dp_rank, self.total, self.dp_size))
        permutation = torch.randperm(
            self.total, generator=make_generator("streaming", self.seed, self.epoch)
        )
        return permutation[self.dp_rank :: self.dp_size][: self.length].tolist()

    def __iter__(self) -> Iterator[int]:
        indices = self.indices()[self.skip :]
        if self.parts > 1:
            size, full = (
                self.batch_size // self.parts,
                len(indices) - len(indices) % self.batch_size,
            )
            indices = [
                i
                for start in range(0, full, self.batch_size)
                for i in indices[start + self.part * size : start + (self.part + 1) * size]
            ]
        return iter(indices)

    def __len__(self) -> int:
        left = max(self.length - self.skip, 0)
        if self.parts > 1:
            return left // self.batch_size * (self.batch_size // self.parts)
        return left


class EpochSampler(Sampler):
    """A ``ShardedSampler`` whose indices carry their epoch, ``(index, epoch)``: the workers of a
    persistent DataLoader draw each sample's augmentation for the epoch the main process is in."""

    def __init__(self, sampler: ShardedSampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.epoch, self.sampler.skip = epoch, skip_batches * self.sampler.batch_size

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((index, epoch) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class ImageFileDataset(Dataset):
    """(uint8 [3, S, S] image, label) for a sample of a file list: ``dataset[index]`` in the
    dataset's epoch, or ``dataset[(index, epoch)]`` (what ``EpochSampler`` yields, so that
    persistent workers follow the epochs)."""

    def __init__(
        self,
        files: list[str],
        labels: list[int],
        *,
        train: bool,
        image_size: int,
        seed: int,
        epoch: int,
        backend: Literal["pil", "torchvision"],
    ) -> None:
        # One numpy buffer each, not a million Python objects: a forked DataLoader worker that
        # indexed a list would touch each string's reference count, copying the pages holding
        # them, until every worker of every rank held its own copy of the list.
        self.files = np.array([os.fsencode(f) for f in files], dtype=np.bytes_)
        self.labels = np.array(labels, dtype=np.int64)
        self.train = train
        self.image_size = image_size
        self.seed = seed
        self.epoch = epoch
        self.backend = backend

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        path = os.fsdecode(self.files[index])
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except Exception as error:
            raise DataError(
                f"cannot decode image {path}: {type(error).__name__}: {error}. Delete or replace "
                "the file."
            ) from error
        if self.train:
            rng = np.random.default_rng(derive_seed("streaming_augment", self.seed, epoch, index))
            box = random_resized_crop_box(image.size, rng)
            flip = bool(rng.random() < 0.5)
        else:
            box, flip = center_crop_box(image.size, self.image_size), False
        if self.backend == "torchvision":
            tensor = _crop_torchvision(image, box, flip, self.image_size)
        else:
            tensor = _crop_pil(image, box, flip, self.image_size)
        return tensor, int(self.labels[index])


def make_streaming_loader(
    root: str | os.PathLike[str],
    split: str,
    batch_size: int,
    *,
    train: bool,
    image_size: int = 224,
    workers: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    dp_rank: int = 0,
    dp_size: int = 1,
    drop_last: bool | None = None,
    pin_memory: bool = False,
    backend: Backend = "auto",
    skip_batches: int = 0,
    part: int = 0,
    parts: int = 1,
    listed: tuple[list[str], list[int]] | None = None,
) -> DataLoader:
    """DataLoader over ``root/<split>/<class>/*`` for one epoch of one data-parallel replica.

    Call again (or ``loader.sampler.set_epoch(e); loader.dataset.set_epoch(e)``) per epoch.
    ``batch_size`` is per replica. Class indices follow the sorted folder names of ``split``.
    ``skip_batches``: start the epoch after its first batches (a resumed epoch; never decoded).
    ``part`` of ``parts``: only that slice of each batch (``batch_size / parts`` images per
    yielded batch), for ranks that decode one slice each and gather the batch.
    ``listed``: the split's (files, labels) where the caller has listed them already.
    Images come as uint8 (a quarter of float32's worker-to-host traffic); normalise them where
    they are used (``normalise``, on the device).
    """
    positive_int("batch_size", batch_size, error=DataError, fix="it is per replica")
    positive_int("image_size", image_size, error=DataError)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    if workers < 0:
        raise DataError(f"workers must be >= 0 (0 decodes in the main process), got {workers}.")
    files, labels = listed if listed is not None else list_image_files(Path(root).expanduser(),
                                                                        split)
    chosen = _choose_backend(backend)
    dataset = ImageFileDataset(
        files, labels, train=train, image_size=image_size, seed=seed, epoch=epoch, backend=chosen
    )
    if parts > 1 and (not train or batch_size % parts):
        raise DataError(
            f"only full training batches split into parts: batch_size={batch_size}, parts={parts}."
        )
    sampler = ShardedSampler(
        len(files),
        shuffle=train,
        seed=seed,
        epoch=epoch,
        dp_rank=dp_rank,
        dp_size=dp_size,
        skip=skip_batches * batch_size,
        part=part,
        parts=parts,
        batch_size=batch_size,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size // parts,
        sampler=EpochSampler(sampler),
        num_workers=workers,
        drop_last=train if drop_last is None else drop_last,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,  # the epoch travels with each index (EpochSampler)
    )


def list_image_files(
    root: Path, split: str, classes: list[str] | None = None
) -> tuple[list[str], list[int]]:
    """The split's image files and their class indices, in order. ``classes``: the training
    split's class folders, which this split must have too (else its labels would be shifted)."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir} does not exist; expected ImageNet-style folders "
            f"root/{split}/<class>/<image> "
            "(e.g. root/train/n01440764/*.JPEG). Check dataset.root and the split name."
        )
    found = list_classes(split_dir)
    if classes is not None and found != classes:
        raise DataError(
            f"{split_dir} must have the same class folders as {root / 'train'}: missing "
            f"{sorted(set(classes) - set(found))[:5]}, unexpected "
            f"{sorted(set(found) - set(classes))[:5]} (at most 5 of each shown). Add or rename "
            f"folders so both splits list the same classes."
        )
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        found = image_files(split_dir / name)
        if not found:
            raise DataError(
                f"class folder {split_dir / name} has no images (accepted extensions: "
                f"{', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder."
            )
        files.extend(str(f) for f in found)
        labels.extend([label] * len(found))
    return files, labels


def _choose_backend(backend: str) -> Literal["pil", "torchvision"]:
    if backend == "pil":
        return "pil"
    available = load_torchvision_functional() is not None
    if backend == "torchvision":
        if not available:
            raise DataError(
                "backend='torchvision' but torchvision does not import here; use backend='pil' or "
                "'auto'."
            )
        return "torchvision"
    if backend == "auto":
        return "torchvision" if available else "pil"
    raise DataError(f"backend must be 'auto', 'pil' or 'torchvision', got {backend!r}.")


# ---------------------------------------------------------------------------- crop geometry
# Boxes are (left, top, width, height) in pixels of the decoded image.


def random_resized_crop_box(
    size: tuple[int, int], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, with a numpy generator."""
    width, height = size
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the largest centred crop with the aspect ratio clamped into range.
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif in_ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(size: tuple[int, int], image_size: int) -> tuple[int, int, int, int]:
    """The region that "resize short side to image_size * 256/224, centre-crop image_size"
    keeps, expressed in original pixels (so resize + crop is one resampling step)."""
    width, height = size
    short = min(width, height)
    resized_short = round(image_size * EVAL_RESIZE_RATIO)
    crop = min(
        short, short * image_size / resized_short
    )  # side of the kept square, original pixels
    left = (width - crop) / 2
    top = (height - crop) / 2
    return round(left), round(top), max(1, round(crop)), max(1, round(crop))


def imagenet_mean_std(device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's channel mean and std, [3, 1, 1] float32 on ``device``. A loader makes them once:
    a tensor made from a list on a GPU is a copy from pageable memory, which waits for the GPU."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalise(pixels: torch.Tensor, mean_std=None) -> torch.Tensor:
    """uint8 images [..., 3, H, W] to float32, ImageNet-normalised, on their own device
    (``mean_std``: ``imagenet_mean_std`` of that device, made here where not given)."""
    mean, std = mean_std if mean_std is not None else imagenet_mean_std(pixels.device)
    return (pixels.to(torch.float32) / 255.0 - mean) / std


def _crop_pil(
    image: Image.Image, box: tuple[int, int, int, int], flip: bool, image_size: int
) -> torch.Tensor:
    left, top, w, h = box
    # resize(box=...) crops and resamples in one step (Pillow >= 7.0 antialiases downscales).
    out = image.resize((image_size, image_size), _BILINEAR, box=(left, top, left + w, top + h))
    if flip:
        out = out.transpose(_FLIP)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _crop_torchvision(
    image: Image.Image, box: tuple[int, int, int, int], flip: bool, image_size: int
) -> torch.Tensor:
    functional = load_torchvision_functional()
    if functional is None:  # e.g. a worker where the import broke: stay correct, use Pillow
        return _crop_pil(image, box, flip, image_size)
    left, top, w, h = box
    pixels = functional.pil_to_tensor(image)
    pixels = functional.resized_crop(
        pixels, top, left, h, w, [image_size, image_size], antialias=True
    )
    if flip:
        pixels = functional.hflip(pixels)
    return pixels.contiguous()


class StreamingEpochLoader:
    """``DeviceLoader``'s interface over ``make_streaming_loader``: ``set_epoch``, then iterate
    (images, labels) on ``device``, normalised there. One DataLoader whose workers persist across
    epochs (each index carries its epoch).

    With ``gp_group`` (the gp ranks of one model, which all need the same batch), each gp rank
    decodes 1/gp of every training batch and the uint8 slices are all-gathered over the group:
    the node decodes each image once instead of gp times. Evaluation batches (the last may be
    partial) and batches gp does not divide are decoded whole by every rank.

    ``classes``: the training split's class folders, which an evaluation split must have too
    (its labels are their indices)."""

    def __init__(
        self,
        root,
        split: str,
        batch_size: int,
        *,
        train: bool,
        device,
        image_size: int = 224,
        workers: int | None = None,
        seed: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        channels_last: bool = False,
        gp_group=None,
        classes: list[str] | None = None,
    ) -> None:
        self.root, self.split, self.batch_size = Path(root).expanduser(), split, batch_size
        # Listed once (a million files on a network file system take a while): the DataLoader
        # gets these very lists.
        self.files, self.labels = list_image_files(self.root, split, classes)
        self.classes = classes if classes is not None else list_classes(self.root / split)
        self.num_classes = len(self.classes)
        self.device, self.channels_last = torch.device(device), channels_last
        self.mean_std = imagenet_mean_std(self.device)
        gp = torch.distributed.get_world_size(gp_group) if gp_group is not None else 1
        self.gp_group = gp_group if gp > 1 and train and batch_size % gp == 0 else None
        parts = dict(part=torch.distributed.get_rank(gp_group), parts=gp) if self.gp_group else {}
        self.loader = make_streaming_loader(
            self.root,
            split,
            batch_size,
            train=train,
            image_size=image_size,
            workers=workers,
            seed=seed,
            dp_rank=dp_rank,
            dp_size=dp_size,
            pin_memory=self.device.type == "cuda",
            listed=(self.files, self.labels),
            **parts,
        )
        self.sharded = ShardedSampler(
            len(self.files), shuffle=train, seed=seed, epoch=0, dp_rank=dp_rank, dp_size=dp_size
        )

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch the next iteration reads, from its batch ``skip_batches`` on."""
        self.loader.sampler.set_epoch(epoch, skip_batches)

    def __len__(self) -> int:
        if self.loader.drop_last:
            return self.sharded.length // self.batch_size
        return -(-self.sharded.length // self.batch_size)

    def __iter__(self):
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if self.gp_group is not None:
                images, labels = (self._gather(t) for t in (images, labels))
            yield (normalise(images, self.mean_std).contiguous(memory_format=memory_format),
                   labels)

    def _gather(self, part: torch.Tensor) -> torch.Tensor:
        parts = [
            torch.empty_like(part) for _ in range(torch.distributed.get_world_size(self.gp_group))
        ]
        torch.distributed.all_gather(parts, part, group=self.gp_group)
        return torch.cat(parts)
