"""Data handling for twolevel_dist: in-memory arrays, device-side loading, streaming.

Pure data code: no torch.distributed, and torchvision is only ever imported (guarded) by
the streaming loader.
"""

from twolevel_dist.data.arrays import ImageArrays
from twolevel_dist.data.cifar import download_cifar, load_cifar, verify_and_extract
from twolevel_dist.data.device_loader import DeviceLoader, crop_and_flip
from twolevel_dist.data.image_folder import extract_tar, load_image_folder
from twolevel_dist.data.registry import (
    IN_MEMORY_DATASETS,
    STREAMING_DATASETS,
    is_streaming,
    load_arrays,
)
from twolevel_dist.data.seeding import derive_seed
from twolevel_dist.data.streaming import IMAGENET_MEAN, IMAGENET_STD, make_streaming_loader
from twolevel_dist.data.synthetic import make_synthetic
from twolevel_dist.errors import DataError

__all__ = [
    "DataError",
    "DeviceLoader",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IN_MEMORY_DATASETS",
    "ImageArrays",
    "STREAMING_DATASETS",
    "crop_and_flip",
    "derive_seed",
    "download_cifar",
    "extract_tar",
    "is_streaming",
    "load_arrays",
    "load_cifar",
    "load_image_folder",
    "make_streaming_loader",
    "make_synthetic",
    "verify_and_extract",
]
