"""The train and test loaders of a data set config, for one rank of a (dp, gp) layout."""

import hashlib
import os
from pathlib import Path

import torch

from twolevel_dist.data import DeviceLoader, is_streaming, load_arrays
from twolevel_dist.data.streaming import StreamingEpochLoader
from twolevel_dist.errors import ConfigError, DataError
from twolevel_dist.parallel.agreement import gather_from_every_rank, raise_first


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
    """CIFAR-size data on the device as uint8, augmented there, loaded in turns
    (``load_in_turns``)."""
    def load():
        return load_arrays(dataset.name, root=dataset.root, download=dataset.download,
                           seed=seed, image_size=dataset.image_size,
                           num_classes=dataset.num_classes,
                           synthetic_train_size=dataset.train_size,
                           synthetic_test_size=dataset.test_size, cache_dir=dataset.cache_dir)
    train_data, test_data = load_in_turns(load, rank, world)
    if dataset.train_images is not None:
        train_data = train_data.balanced_subset(dataset.train_images)
    mean, std = train_data.mean_std()
    args = dict(device=device, seed=seed, dp_rank=dp_rank, dp_size=dp_size, mean=mean,
                std=std, channels_last=channels_last)
    return (DeviceLoader(train_data, per_replica, train=True, **args),
            DeviceLoader(test_data, per_replica, train=False, **args))


def load_in_turns(load, rank: int, world: int):
    """``load()`` on every rank, in three turns: rank 0; then the first rank of each other
    node (LOCAL_RANK 0); then the others. A cache all nodes share is filled once, by rank 0, and
    read by the rest; a node-local one (``dataset.cache_dir`` on local disk) once per node, by
    its first rank. Never do two ranks of a node extract one archive, download one file or
    decode into one cache at the same time. A DataError on any rank stops every rank after its
    turn, with the first such rank's message."""
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    turn = 0 if rank == 0 else 1 if local_rank == 0 else 2
    if world == 1:
        return load()
    loaded = None
    for current in range(3):
        problem = None
        if turn == current:
            try:
                loaded = load()
            except DataError as error:
                problem = str(error)
        raise_first(problem, DataError)
    return loaded


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
    train = StreamingEpochLoader(root, "train", per_replica, train=True, gp_group=gp_group,
                                 **args)
    test = StreamingEpochLoader(root, eval_split, per_replica, train=False,
                                classes=train.classes, **args)
    _check_every_rank_lists_the_same_files(root, train, test)
    return train, test


def _check_every_rank_lists_the_same_files(root, *loaders) -> None:
    """Each rank lists the folder itself; ranks that saw different files (a folder changed
    during the start, a node's stale network file system cache) would shard different lists,
    read overlapping images and part at an epoch's end on unequal batch counts."""
    digest = hashlib.sha256()
    for loader in loaders:
        digest.update("\n".join(loader.files).encode() + b"\0")
    mine = (tuple(len(loader.files) for loader in loaders), digest.hexdigest())
    everyone = gather_from_every_rank(mine)
    other = next((rank for rank, theirs in enumerate(everyone) if theirs != everyone[0]), None)
    if other is not None:
        def counts(rank):
            return " / ".join(f"{n:,}" for n in everyone[rank][0])
        names = " (the same counts, other names)" if everyone[other][0] == everyone[0][0] else ""
        raise DataError(
            f"the ranks list different images under {root}: rank 0 sees {counts(0)} (train / "
            f"{loaders[-1].split}), rank {other} {counts(other)}{names}; was the folder changing "
            f"during the start, or does a node's network file system cache show it stale? Start "
            f"again once every node sees the same files")
