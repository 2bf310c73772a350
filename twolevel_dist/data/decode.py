"""Pillow decoding of image files into uint8 CHW numpy arrays (runs in worker processes)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from twolevel_dist.errors import DataError

# Image.Resampling appeared in Pillow 9.1; the plain constant works on every version.
_BILINEAR = getattr(getattr(Image, "Resampling", Image), "BILINEAR")


def decode_image(path: str | os.PathLike[str], image_size: int | None = None) -> np.ndarray:
    """One image as uint8 ``[3, H, W]``; resized to ``image_size`` x ``image_size`` if given.

    The resize is a plain (aspect-changing) bilinear resize: for small classification sets
    whose images are already (nearly) square this is what users expect; crops belong to
    augmentation, not to loading.
    """
    try:
        with Image.open(path) as image:
            image.load()
            # JPEGs are usually RGB already; convert() would only copy them (~10% of the time).
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            if image_size is not None and rgb.size != (image_size, image_size):
                rgb = rgb.resize((image_size, image_size), _BILINEAR)
            pixels = np.asarray(rgb, dtype=np.uint8)
    except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(
            f"cannot decode image {path}: {type(error).__name__}: {error}. "
            "Delete or replace the file (it is corrupt or not an image)."
        ) from error
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def decode_chunk(paths: Sequence[str], image_size: int | None = None) -> np.ndarray:
    """Images as one uint8 ``[n, 3, H, W]`` array; they must share one size unless resized."""
    if not paths:
        raise DataError("decode_chunk got no paths; pass at least one image file.")
    first = decode_image(paths[0], image_size)
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    out[0] = first
    for i in range(1, len(paths)):
        pixels = decode_image(paths[i], image_size)
        if pixels.shape != first.shape:
            raise mixed_size_error(paths[0], first.shape, paths[i], pixels.shape)
        out[i] = pixels
    return out


def mixed_size_error(
    path_a: str, shape_a: tuple[int, ...], path_b: str, shape_b: tuple[int, ...]
) -> DataError:
    return DataError(
        f"images differ in size: {path_a} is {shape_a[2]}x{shape_a[1]} (WxH) but {path_b} is "
        f"{shape_b[2]}x{shape_b[1]}; set image_size (dataset.image_size) to resize all images "
        "to one square size."
    )
