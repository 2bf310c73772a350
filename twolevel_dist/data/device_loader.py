"""DeviceLoader: a CIFAR-size data set held on the training device, augmented there.

No DataLoader and no worker processes: the uint8 images (150 MB for CIFAR-10) are moved to
the device once, and each batch is a gather + crop + flip + normalise on the device
(airbench / nanoGPT style), which keeps small-image training from being input-bound.

Determinism contract (the distributed engine relies on it):

* Each epoch, the whole set is permuted with a generator seeded by (seed, epoch): the same
  permutation on every rank. Replica ``dp_rank`` takes ``perm[dp_rank::dp_size]``, truncated
  so every replica has the same number of samples (and batches). Different dp ranks get
  disjoint samples.
* Augmentation randomness comes from a generator seeded by (seed, epoch, dp_rank), never from
  the global RNG, so ranks with the same (seed, epoch, dp_rank) -- e.g. the ranks of one
  group-convolution group -- see bit-identical batches.
* Eval: no shuffle, no augmentation; replica r takes samples r, r + dp_size, ... and the last
  partial batch is kept, so the replicas together cover every sample exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from twolevel_dist.data.arrays import ImageArrays
from twolevel_dist.data.seeding import make_generator
from twolevel_dist.errors import DataError


class DeviceLoader:
    """Batches of ``(images [B, 3, H, W] normalised float, labels [B] int64)`` on ``device``."""

    def __init__(
        self,
        data: ImageArrays,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        pad: int = 4,
        flip: bool = True,
        drop_last: bool | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        _check_arguments(data, batch_size, dp_rank, dp_size, seed, pad, dtype)
        self.batch_size = batch_size
        self.train = bool(train)
        self.device = torch.device(device)
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.pad = pad if self.train else 0
        self.flip = bool(flip) and self.train
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.epoch, self.skip_batches = 0, 0
        self.num_classes = data.num_classes

        total = len(data)
        # Train truncates so all replicas have equal work; eval keeps every sample.
        self.num_samples = total // dp_size if self.train else len(range(dp_rank, total, dp_size))
        if self.num_samples == 0:
            raise DataError(
                f"data-parallel shard {dp_rank} of {dp_size} is empty: the data set has only "
                f"{total} samples; use fewer data-parallel replicas or a larger data set."
            )
        if self.drop_last and self.num_samples < batch_size:
            share = f" (replica {dp_rank}'s share of {dp_size})" if dp_size > 1 else ""
            raise DataError(
                f"a training batch of {batch_size} images per replica is more than the "
                f"{self.num_samples} training images{share}: an epoch would have no full batch; "
                f"lower the batch size (train.batch_size, or finetune.batch_size in compress) or "
                f"train on more images"
            )

        mean, std = _check_mean_std(data, mean, std)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses, from its
        batch ``skip_batches`` on (a resumed epoch: the same batches as if never interrupted)."""
        _require_int("epoch", epoch, minimum=0, fix="epochs count from 0")
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def shard_indices(self) -> torch.Tensor:
        """This replica's sample indices (CPU int64) for the current epoch, in batch order."""
        total = self.images.shape[0]
        if not self.train:
            return torch.arange(self.dp_rank, total, self.dp_size)
        permutation = torch.randperm(
            total, generator=make_generator("device_loader", self.seed, self.epoch)
        )
        return permutation[self.dp_rank :: self.dp_size][: self.num_samples]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.shard_indices()
        height, width = self.images.shape[2], self.images.shape[3]
        # One draw per sample for the whole epoch, on the CPU generator, so the random numbers
        # do not depend on the device or on the batch size.
        generator = make_generator("device_loader_augment", self.seed, self.epoch, self.dp_rank)
        offsets_y = torch.randint(0, 2 * self.pad + 1, (len(indices),), generator=generator)
        offsets_x = torch.randint(0, 2 * self.pad + 1, (len(indices),), generator=generator)
        flips = torch.rand(len(indices), generator=generator) < 0.5

        indices = indices.to(self.device)
        augment = self.pad > 0 or self.flip
        if augment:
            offsets_y, offsets_x, flips = (t.to(self.device) for t in (offsets_y, offsets_x, flips))
        for batch in range(self.skip_batches, len(self)):
            start = batch * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            batch_indices = indices[start:stop]
            images = self.images[batch_indices]
            if augment:
                images = crop_and_flip(
                    images,
                    offsets_y[start:stop],
                    offsets_x[start:stop],
                    flips[start:stop] if self.flip else None,
                    self.pad,
                    height,
                    width,
                )
            yield self._normalise(images), self.labels[batch_indices]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        out = (images.to(torch.float32).div_(255.0) - self._mean).div_(self._std).to(self.dtype)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def _check_arguments(data, batch_size, dp_rank, dp_size, seed, pad, dtype) -> None:
    """DeviceLoader's arguments, each refused with its fix."""
    if not isinstance(data, ImageArrays):
        raise DataError(
            f"DeviceLoader needs an ImageArrays, got {type(data).__name__}; see "
            "twolevel_dist.data.load_arrays."
        )
    _require_int(
        "batch_size",
        batch_size,
        minimum=1,
        fix="set the per-replica batch size to a positive int",
    )
    _require_int(
        "dp_size", dp_size, minimum=1, fix="dp_size is the number of data-parallel replicas"
    )
    _require_int("seed", seed, minimum=None, fix="pass an int seed")
    _require_int(
        "pad",
        pad,
        minimum=0,
        fix="pad is the crop padding in pixels (4 for CIFAR, 0 to disable)",
    )
    if not isinstance(dp_rank, int) or isinstance(dp_rank, bool) or not 0 <= dp_rank < dp_size:
        raise DataError(
            f"dp_rank must be an int in [0, {dp_size - 1}] (dp_size={dp_size}), got {dp_rank!r}."
        )
    if not dtype.is_floating_point:
        raise DataError(
            f"dtype must be a floating-point dtype (float32, bfloat16, ...), got {dtype}."
        )


def crop_and_flip(
    images: torch.Tensor,
    offsets_y: torch.Tensor,
    offsets_x: torch.Tensor,
    flips: torch.Tensor | None,
    pad: int,
    height: int,
    width: int,
) -> torch.Tensor:
    """Zero-pad by ``pad``, crop ``height`` x ``width`` at per-image offsets, optionally mirror.

    Image i is ``padded[i, :, oy:oy+H, ox:ox+W]`` (then flipped left-right where ``flips[i]``),
    computed for the whole batch as one gather: flipping is folded into the column indices.
    """
    padded = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
    steps_y = torch.arange(height, device=images.device)
    steps_x = torch.arange(width, device=images.device)
    rows = offsets_y[:, None] + steps_y  # [B, H]
    columns = steps_x.expand(images.shape[0], width)
    if flips is not None:
        columns = torch.where(flips[:, None], (width - 1) - columns, columns)
    columns = offsets_x[:, None] + columns  # [B, W]
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channels, rows[:, None, :, None], columns[:, None, None, :]]


def _require_int(name: str, value: object, *, minimum: int | None, fix: str) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or (minimum is not None and value < minimum)
    ):
        bound = "an int" if minimum is None else f"an int >= {minimum}"
        raise DataError(f"{name} must be {bound}, got {value!r}; {fix}.")


def _check_mean_std(
    data: ImageArrays, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    if mean is None or std is None:
        data_mean, data_std = data.mean_std()
        mean = data_mean if mean is None else mean
        std = data_std if std is None else std
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if len(mean) != 3 or len(std) != 3:
        raise DataError(
            f"mean and std need one value per RGB channel (3 each), got mean={mean}, std={std}."
        )
    if any(not s > 0 for s in std):
        raise DataError(
            f"std must be positive in every channel, got {std}; a constant channel cannot be "
            "normalised."
        )
    return mean, std
