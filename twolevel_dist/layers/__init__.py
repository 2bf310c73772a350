"""The convolution family (single device): sc, gc, gc2l, shuffle, flgc, and ``make_conv``."""

from twolevel_dist.layers.coarse import (
    add_coarse_,
    coarse_correction,
    coarse_weight_grad,
    is_channels_last,
    representatives_grad,
)
from twolevel_dist.layers.factory import CONV_KINDS, make_conv
from twolevel_dist.layers.flgc import FullyLearnableGroupConv2d, straight_through_one_hot
from twolevel_dist.layers.group import (
    DepthwiseConv2d,
    GroupConv2d,
    ShuffleGroupConv2d,
    StandardConv2d,
    StemConv2d,
    channel_shuffle,
)
from twolevel_dist.layers.taps import InputGradSum, local_convolution, representatives_taps
from twolevel_dist.layers.two_level import TwoLevelGroupConv2d, resolve_impl


def to_layout(module, memory_format):
    """Give every 4-D convolution weight ``memory_format`` (e.g. channels_last). ``Module.to``
    cannot: it refuses GC-2L's 5-D fused weight, whose slices are 4-D when the convolution runs."""
    for param in module.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=memory_format)
    return module

__all__ = [
    "CONV_KINDS", "make_conv", "StandardConv2d", "GroupConv2d", "TwoLevelGroupConv2d",
    "ShuffleGroupConv2d", "FullyLearnableGroupConv2d", "StemConv2d", "DepthwiseConv2d",
    "channel_shuffle", "coarse_correction", "straight_through_one_hot", "to_layout",
    # what the sharded GC-2L layer (parallel.sharded) builds on
    "add_coarse_", "coarse_weight_grad", "is_channels_last", "representatives_grad",
    "InputGradSum", "local_convolution", "representatives_taps",
    "resolve_impl",
]
