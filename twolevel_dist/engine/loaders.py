"""The train and test loaders of a data set config, for one rank of a (dp, gp) layout."""

from pathlib import Path

import torch
import torch.distributed as dist

from twolevel_dist.data import DeviceLoader, is_streaming, load_arrays
from twolevel_dist.data.streaming import StreamingEpochLoader
from twolevel_dist.errors import ConfigError, DataError


def build_loaders(dataset, *, seed: int, device: torch.device, rank: int = 0, world: int = 1,
                  dp_rank: int = 0, dp_size: int = 1, per_replica: int,
                  channels_last: bool = False, gp_group=None):
    """(train, test) loaders for ``dataset`` (a ``DatasetConfig``): streamed through DataLoader
    workers for ImageNet-size folders, held on the device otherwise. Every rank of a gp group
    reads the same batches (streamed ones decoded a slice per gp rank of ``gp_group`` and
    gathered); dp replicas read disjoint shards of ``per_replica`` images."""
    if is_streaming(dataset.name):
        return _streaming_loaders(dataset, seed, device, dp_rank, dp_size, per_replica,
                                  channels_last, gp_group)
    return _in_memory_loaders(dataset, seed, device, rank, world, dp_rank, dp_size, per_replica,
                              channels_last)


def _in_memory_loaders(dataset, seed, device, rank, world, dp_rank, dp_size, per_replica,
                       channels_last):
    """CIFAR-size data on the device as uint8, augmented there. Rank 0 loads first, so that the
    others read its decoded cache instead of decoding in parallel."""
    def load():
        return load_arrays(dataset.name, root=dataset.root, download=dataset.download,
                           seed=seed, image_size=dataset.image_size,
                           num_classes=dataset.num_classes,
                           synthetic_train_size=dataset.train_size,
                           synthetic_test_size=dataset.test_size, cache_dir=dataset.cache_dir)
    loaded, problem = None, None
    if rank == 0:
        try:
            loaded = load()
        except DataError as error:      # every rank stops with it (rank 0 says why)
            problem = str(error)
    if world > 1:                       # the others wait for rank 0's cache here
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = problems[0]
    if problem is not None:
        raise DataError(problem)
    train_data, test_data = loaded if rank == 0 else load()
    if dataset.train_images is not None:
        train_data = train_data.balanced_subset(dataset.train_images)
    mean, std = train_data.mean_std()
    args = dict(device=device, seed=seed, dp_rank=dp_rank, dp_size=dp_size, mean=mean,
                std=std, channels_last=channels_last)
    return (DeviceLoader(train_data, per_replica, train=True, **args),
            DeviceLoader(test_data, per_replica, train=False, **args))


def _streaming_loaders(dataset, seed, device, dp_rank, dp_size, per_replica, channels_last,
                       gp_group):
    """ImageNet-size folders streamed through DataLoader workers (random-resized crops)."""
    if not dataset.root:
        raise ConfigError(f"dataset={dataset.name} needs dataset.root=<folder with train/ and "
                          f"val/ (or test/) class folders>")
    if dataset.train_images is not None:
        raise ConfigError(f"dataset.train_images={dataset.train_images} takes a subset of an "
                          f"in-memory data set; {dataset.name} is streamed: set it to null")
    root = Path(dataset.root).expanduser()
    eval_split = "val" if (root / "val").is_dir() else "test"
    args = dict(device=device, image_size=dataset.image_size or 224, workers=dataset.workers,
                seed=seed, dp_rank=dp_rank, dp_size=dp_size, channels_last=channels_last)
    return (StreamingEpochLoader(root, "train", per_replica, train=True, gp_group=gp_group, **args),
            StreamingEpochLoader(root, eval_split, per_replica, train=False, **args))
