"""Data handling for twolevel_dist: in-memory arrays, device-side loading, streaming.

Pure data code: no torch.distributed, and torchvision is only ever imported (guarded) by
the streaming loader.
"""

from .arrays import ImageArrays
from .cifar import download_cifar, load_cifar, verify_and_extract
from .device_loader import DeviceLoader, crop_and_flip
from .errors import DataError
from .image_folder import extract_tar, load_image_folder
from .registry import IN_MEMORY_DATASETS, STREAMING_DATASETS, is_streaming, load_arrays
from .seeding import derive_seed
from .streaming import IMAGENET_MEAN, IMAGENET_STD, make_streaming_loader
from .synthetic import make_synthetic

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
