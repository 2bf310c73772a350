"""Standard, group and shuffled group convolutions (single device).

They are thin ``nn.Conv2d`` subclasses: the subclass names the kind, so that ``parallelize`` can
look up how each kind is split across ranks, and the checks give clear errors up front.
"""

import torch
import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers.checks import check_conv_args
from twolevel_dist.layers.init import he_normal_


class _KaimingConv2d(nn.Conv2d):
    """A bias-free convolution with padding k//2, initialised He-normal over its true fan-in."""

    kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1):
        check_conv_args(self.kind, in_channels, out_channels, kernel_size, stride, groups)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2, groups=groups, bias=False)

    def reset_parameters(self) -> None:
        he_normal_(self.weight, fan_in=self.in_channels // self.groups * self.kernel_size[0] ** 2)


class StemConv2d(_KaimingConv2d):
    """The network's first convolution. It reads the full image, so it is never replaced; across
    ranks each rank computes only its own slice of its output channels."""

    kind = "stem"


class DepthwiseConv2d(_KaimingConv2d):
    """A depthwise convolution (MobileNetV2): channel-local, never replaced."""

    kind = "depthwise"

    def __init__(self, channels: int, kernel_size: int, stride: int = 1):
        super().__init__(channels, channels, kernel_size, stride, groups=channels)


class StandardConv2d(_KaimingConv2d):
    """``sc``: every output channel sees every input channel."""

    kind = "sc"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1):
        if groups != 1:
            raise ConfigError(
                f"sc: a standard convolution has no groups, got groups={groups}; use groups=1 "
                f"(to split SC across ranks by output channels, parallelize it with gp > 1)")
        super().__init__(in_channels, out_channels, kernel_size, stride, groups=1)


class GroupConv2d(_KaimingConv2d):
    """``gc``: the block-Jacobi approximation of SC; group j maps input block j to output
    block j."""

    kind = "gc"


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle: output channel a*groups + b is input channel b*(C/groups) + a."""
    batch, channels = x.shape[:2]
    return x.unflatten(1, (groups, channels // groups)).transpose(1, 2).flatten(1, 2)


class ShuffleGroupConv2d(GroupConv2d):
    """``shuffle``: a group convolution followed by a channel shuffle of its output."""

    kind = "shuffle"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(super().forward(x), self.groups)
