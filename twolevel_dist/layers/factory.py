"""``make_conv``: the one place a network asks for a replaceable convolution."""

import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers.flgc import FullyLearnableGroupConv2d
from twolevel_dist.layers.group import GroupConv2d, ShuffleGroupConv2d, StandardConv2d
from twolevel_dist.layers.two_level import TwoLevelGroupConv2d

CONV_KINDS: dict[str, type[nn.Module]] = {
    "sc": StandardConv2d,
    "gc": GroupConv2d,
    "gc2l": TwoLevelGroupConv2d,
    "shuffle": ShuffleGroupConv2d,
    "flgc": FullyLearnableGroupConv2d,
}


def make_conv(kind: str, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              groups: int = 1) -> nn.Module:
    """A bias-free convolution of the given kind with padding kernel_size // 2."""
    if kind not in CONV_KINDS:
        raise ConfigError(f"unknown convolution kind {kind!r}; choose one of {sorted(CONV_KINDS)}")
    return CONV_KINDS[kind](in_channels, out_channels, kernel_size, stride, groups)
