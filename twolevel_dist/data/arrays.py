"""ImageArrays: a whole (small) data set held as one uint8 tensor plus labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from twolevel_dist.errors import DataError

# Statistics are accumulated over chunks of about this many values so a 50k x 3 x 32 x 32
# uint8 set never needs a full-size int64 copy (that would be 8x its size).
_STATS_CHUNK_VALUES = 1 << 22


@dataclass
class ImageArrays:
    """Images as uint8 ``[N, 3, H, W]`` (contiguous), labels as int64 ``[N]``, class names.

    ``labels[i]`` indexes ``classes``. Non-contiguous images are made contiguous rather than
    rejected, since the layout, not the caller's view of it, is what matters downstream.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        self._check_images()
        self._check_classes()
        self._check_labels()

    def _check_images(self) -> None:
        images = self.images
        if not isinstance(images, torch.Tensor):
            raise DataError(
                f"ImageArrays.images must be a torch.Tensor, got {type(images).__name__}; "
                "convert with torch.from_numpy(array)."
            )
        if images.dtype != torch.uint8:
            raise DataError(
                f"ImageArrays.images must be uint8 (0..255 pixel values), got {images.dtype}; "
                "convert float images in [0, 1] with (x * 255).round().clamp(0, "
                "255).to(torch.uint8)."
            )
        if images.dim() != 4 or images.shape[1] != 3:
            raise DataError(
                f"ImageArrays.images must have shape [N, 3, H, W] (RGB, channels first), got "
                f"{list(images.shape)}; convert HWC arrays with .permute(0, 3, 1, 2) and "
                "grayscale ones by repeating the channel 3 times."
            )
        if images.shape[2] == 0 or images.shape[3] == 0:
            raise DataError(
                f"ImageArrays.images has an empty spatial size {list(images.shape[2:])}; "
                "images must be at least 1x1."
            )
        if not images.is_contiguous():
            self.images = images.contiguous()

    def _check_classes(self) -> None:
        classes = self.classes
        if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) for c in classes):
            raise DataError(
                f"ImageArrays.classes must be a list of class-name strings, got {classes!r}."
            )
        if len(classes) == 0:
            raise DataError("ImageArrays.classes is empty; a data set needs at least one class.")
        if len(set(classes)) != len(classes):
            duplicates = sorted({c for c in classes if list(classes).count(c) > 1})
            raise DataError(
                f"ImageArrays.classes has duplicate names {duplicates}; names must be unique."
            )
        self.classes = list(classes)

    def _check_labels(self) -> None:
        labels = self.labels
        if not isinstance(labels, torch.Tensor):
            raise DataError(
                f"ImageArrays.labels must be a torch.Tensor, got {type(labels).__name__}; "
                "convert with torch.as_tensor(labels, dtype=torch.int64)."
            )
        if labels.dtype != torch.int64:
            raise DataError(
                f"ImageArrays.labels must be int64, got {labels.dtype}; convert with labels.long()."
            )
        if labels.dim() != 1:
            raise DataError(f"ImageArrays.labels must be 1-D [N], got shape {list(labels.shape)}.")
        if labels.shape[0] != self.images.shape[0]:
            raise DataError(
                f"ImageArrays has {self.images.shape[0]} images but {labels.shape[0]} labels; "
                "there must be exactly one label per image."
            )
        if labels.numel() > 0:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= len(self.classes):
                raise DataError(
                    f"ImageArrays.labels must lie in [0, {len(self.classes) - 1}] "
                    f"(one per class name), found values in [{low}, {high}]; "
                    "check the label encoding or the class list."
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def balanced_subset(self, count: int) -> "ImageArrays":
        """The first ``count / num_classes`` images of every class, in stored order: the same
        subset for every run and seed, so that runs on it compare like with like."""
        per_class, left = divmod(count, self.num_classes)
        sizes = torch.bincount(self.labels, minlength=self.num_classes)
        if count < 1 or left:
            raise DataError(
                f"a class-balanced subset of {count} images is not possible with "
                f"{self.num_classes} classes; give a positive multiple of "
                f"{self.num_classes}"
            )
        if per_class > int(sizes.min()):
            raise DataError(
                f"a class-balanced subset of {count} images needs {per_class} per "
                f"class, but the smallest class has {int(sizes.min())}; give at most "
                f"{int(sizes.min()) * self.num_classes} (or null for all "
                f"{len(self)})"
            )
        # Stable sort by label keeps each class's stored order; its first per_class are taken.
        order = torch.sort(self.labels, stable=True).indices
        starts = torch.cumsum(sizes, 0) - sizes
        keep = (starts[:, None] + torch.arange(per_class)).flatten()
        keep = order[keep].sort().values
        return ImageArrays(self.images[keep], self.labels[keep], self.classes)

    def mean_std(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Per-channel mean and standard deviation of the pixels, in [0, 1] units.

        Exact integer sums (int64 cannot overflow here: 255**2 * 2**40 pixels fits) keep the
        result independent of chunking and of the device the images live on.
        """
        if len(self) == 0:
            raise DataError(
                "cannot compute mean/std of an empty ImageArrays; pass mean= and std= explicitly."
            )
        total = torch.zeros(3, dtype=torch.int64)
        total_sq = torch.zeros(3, dtype=torch.int64)
        chunk_images = max(1, _STATS_CHUNK_VALUES // self.images[0].numel())
        for start in range(0, len(self), chunk_images):
            chunk = self.images[start : start + chunk_images].to("cpu", torch.int64)
            total += chunk.sum(dim=(0, 2, 3))
            total_sq += (chunk * chunk).sum(dim=(0, 2, 3))
        count = len(self) * self.images.shape[2] * self.images.shape[3]
        mean = total.double() / count
        var = (total_sq.double() / count - mean * mean).clamp_min(0.0)
        mean01 = (mean / 255.0).tolist()
        std01 = (var.sqrt() / 255.0).tolist()
        return (mean01[0], mean01[1], mean01[2]), (std01[0], std01[1], std01[2])
