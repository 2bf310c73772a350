"""How each module kind of a single-device network becomes rank j's shard.

A rule takes ``(module, rank, world, group, overlap)`` and returns the replacement module. The
channel-wise layers (stem, depthwise conv, BatchNorm) become the same layer on C/N channels;
the replaced convolutions become ``parallel.sharded`` modules. Modules without parameters (ReLU,
pooling, dropout, containers) stay as they are: they act on whatever channels the rank holds.

Every new module is built where the old one lives: each of its tensors is a copy of the old
tensor's slice, so it keeps that tensor's device, dtype and memory format (a model on ``cuda``,
in float64, channels-last or on ``meta`` is sharded in place, as it is).
"""

import torch
import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import (
    DepthwiseConv2d,
    FullyLearnableGroupConv2d,
    GroupConv2d,
    ShuffleGroupConv2d,
    StandardConv2d,
    StemConv2d,
    TwoLevelGroupConv2d,
)
from twolevel_dist.parallel.sharded import (
    ShardedGroupConv2d,
    ShardedLinearHead,
    ShardedShuffleConv2d,
    ShardedTwoLevelConv2d,
    SplitStandardConv2d,
    own_copy,
)

CHANNELWISE_SHARD_DIMS = {"weight": 0, "bias": 0, "running_mean": 0, "running_var": 0,
                          "num_batches_tracked": None}
SHARD_DIMS_ATTR = "_twolevel_shard_dims"


def shard_slice(tensor: torch.Tensor, dim: int | None, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s equal slice of ``tensor`` along ``dim`` (the whole tensor if ``dim`` is
    None)."""
    return tensor if dim is None else tensor.chunk(world, dim)[rank]


def _adopt_slices(new: nn.Module, old: nn.Module, rank: int, world: int) -> nn.Module:
    """Give ``new`` (built on ``meta``: no storage, no initialisation) rank ``rank``'s slice of
    every parameter and buffer of ``old``, copied in old's device, dtype and memory format."""
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, own_copy(shard_slice(param, CHANNELWISE_SHARD_DIMS[name], rank, world)))
    for name, buffer in old.named_buffers(recurse=False):
        setattr(new, name, shard_slice(buffer, CHANNELWISE_SHARD_DIMS[name], rank, world).clone())
    return new


def _require_groups(module, world: int) -> None:
    if module.groups != world:
        raise ConfigError(
            f"{module.kind} layer {module.in_channels}->{module.out_channels} has "
            f"groups={module.groups} but the gp mesh dimension has {world} ranks: each rank owns "
            f"exactly one group, so build the model with groups={world} (or run with gp=1)")


def _shard_two_level(m: TwoLevelGroupConv2d, rank, world, group, overlap):
    _require_groups(m, world)
    return ShardedTwoLevelConv2d(shard_slice(m.weight, 0, rank, world),
                                 shard_slice(m.coarse_weight, 0, rank, world),
                                 m.stride, m.padding, group, overlap=overlap, impl=m.impl)


def _shard_group(m: GroupConv2d, rank, world, group, overlap):
    _require_groups(m, world)
    return ShardedGroupConv2d(shard_slice(m.weight, 0, rank, world), m.stride[0], m.padding[0],
                              group)


def _shard_shuffle(m: ShuffleGroupConv2d, rank, world, group, overlap):
    _require_groups(m, world)
    if (m.out_channels // world) % world:
        raise ConfigError(
            f"shuffle across ranks sends C_out/N^2 channels to every rank, so N^2 must divide "
            f"C_out; layer {m.in_channels}->{m.out_channels} with N={world} does not: use a "
            f"wider network or fewer groups")
    return ShardedShuffleConv2d(shard_slice(m.weight, 0, rank, world), m.stride[0],
                                m.padding[0], group)


def _split_standard(m: StandardConv2d, rank, world, group, overlap):
    if m.out_channels % world or m.in_channels % world:
        raise ConfigError(f"sc layer {m.in_channels}->{m.out_channels} cannot be split over "
                          f"{world} ranks: {world} must divide both channel counts")
    return SplitStandardConv2d(shard_slice(m.weight, 0, rank, world), m.stride[0], m.padding[0],
                               group)


def _refuse_flgc(m, rank, world, group, overlap):
    raise ConfigError(
        "flgc cannot be split across ranks: its learned assignment lets any filter read any input "
        "channel, so there is no fixed group for a rank to own; train it on one process per model "
        "(gp=1, data parallelism only)")


def _channelwise_conv(m: nn.Conv2d, rank, world, group, overlap):
    """Stem (full image in, own output slice out) or depthwise conv (own channels in and out)."""
    if m.out_channels % world:
        raise ConfigError(f"{m.kind} convolution with {m.out_channels} output channels cannot be "
                          f"split over {world} ranks; use a number of groups that divides it")
    local = m.out_channels // world
    with torch.device("meta"):
        if isinstance(m, DepthwiseConv2d):
            new = DepthwiseConv2d(local, m.kernel_size[0], m.stride[0])
        else:
            new = StemConv2d(m.in_channels, local, m.kernel_size[0], m.stride[0])
    return _adopt_slices(new, m, rank, world)


def _batch_norm(m: nn.BatchNorm2d, rank, world, group, overlap):
    if m.num_features % world:
        raise ConfigError(f"BatchNorm over {m.num_features} channels cannot be split over "
                          f"{world} ranks; use a number of groups that divides it")
    with torch.device("meta"):
        new = type(m)(m.num_features // world, eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats)
    return _adopt_slices(new, m, rank, world)


def _linear_head(m: nn.Linear, rank, world, group, overlap):
    if m.in_features % world:
        raise ConfigError(f"the classifier's {m.in_features} input features cannot be split "
                          f"over {world} ranks")
    return ShardedLinearHead(shard_slice(m.weight, 1, rank, world), m.bias, group)


# Most specific class first: lookup walks the module's MRO.
RULES = {
    TwoLevelGroupConv2d: _shard_two_level,
    ShuffleGroupConv2d: _shard_shuffle,
    GroupConv2d: _shard_group,
    StandardConv2d: _split_standard,
    FullyLearnableGroupConv2d: _refuse_flgc,
    StemConv2d: _channelwise_conv,
    DepthwiseConv2d: _channelwise_conv,
    nn.BatchNorm2d: _batch_norm,
    nn.Linear: _linear_head,
}


def rule_for(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in RULES:
            return RULES[cls]
    return None


def shard_dims(module: nn.Module) -> dict:
    """Dimension along which each of the module's own tensors was split (None: replicated)."""
    if hasattr(module, "SHARD_DIMS"):
        return module.SHARD_DIMS
    if isinstance(module, (nn.BatchNorm2d, StemConv2d, DepthwiseConv2d)):
        return CHANNELWISE_SHARD_DIMS
    return {}
