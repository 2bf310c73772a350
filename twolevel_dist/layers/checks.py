"""Argument checks shared by every convolution kind, so each error reads the same way."""

from twolevel_dist.errors import ConfigError


def check_conv_args(kind: str, in_channels, out_channels, kernel_size, stride, groups) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("kernel_size", kernel_size), ("stride", stride), ("groups", groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{kind}: {name} must be a positive integer, got {value!r}")
    if kernel_size % 2 == 0:
        raise ConfigError(
            f"{kind}: kernel_size must be odd so that padding k//2 keeps the spatial size, "
            f"got {kernel_size}; use 1, 3, 5 or 7")
    if in_channels % groups or out_channels % groups:
        raise ConfigError(
            f"{kind}: groups={groups} must divide both in_channels={in_channels} and "
            f"out_channels={out_channels}; pick a number of groups that divides every layer's "
            f"channel count (e.g. a power of two no larger than the narrowest layer)")
