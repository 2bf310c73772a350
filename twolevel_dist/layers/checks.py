"""Argument checks shared by every convolution kind, so each error reads the same way."""

import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.validate import positive_int


def check_conv_args(kind: str, in_channels, out_channels, kernel_size, stride, groups) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel_size", kernel_size), ("stride", stride), ("groups", groups)):
        positive_int(f"{kind}: {name}", value)
    if kernel_size % 2 == 0:
        raise ConfigError(
            f"{kind}: kernel_size must be odd so that padding k//2 keeps the spatial size, "
            f"got {kernel_size}; use 1, 3, 5 or 7")
    if in_channels % groups or out_channels % groups:
        raise ConfigError(
            f"{kind}: groups={groups} must divide both in_channels={in_channels} and "
            f"out_channels={out_channels}; pick a number of groups that divides every layer's "
            f"channel count (e.g. a power of two no larger than the narrowest layer)")


class GroupedConvGeometry(nn.Module):
    """The checked shape of a grouped convolution with padding k//2, for layers that hold their
    weights in their own layout (GC-2L's fused one, FLGC's masked dense one)."""

    kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 groups: int):
        super().__init__()
        check_conv_args(self.kind, in_channels, out_channels, kernel_size, stride, groups)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, kernel_size // 2
        self.groups = groups

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}")
