"""Wide residual networks with pre-activation basic blocks (Zagoruyko & Komodakis), written for one
device. Every convolution but the stem comes from ``make_conv``; a 1x1 shortcut convolution exists
only where the block changes the channel count or the resolution, and is replaced too (coarse k=1).
"""

from functools import partial

import torch
import torch.nn as nn

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers import StemConv2d, make_conv
from twolevel_dist.validate import dropout_probability, positive_int


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, plus the (pre-activated) shortcut."""

    def __init__(self, conv, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv(out_channels, out_channels, 3, 1)
        needs_projection = in_channels != out_channels or stride != 1
        self.shortcut = conv(in_channels, out_channels, 1, stride) if needs_projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = torch.relu(self.bn1(x))
        # As in the reference WRN, a projection shortcut reads the pre-activated input.
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv1(activated)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + residual


def _stage(conv, in_channels, out_channels, blocks, stride, dropout) -> nn.Sequential:
    return nn.Sequential(*[
        PreActBasicBlock(conv, in_channels if i == 0 else out_channels, out_channels,
                         stride if i == 0 else 1, dropout)
        for i in range(blocks)])


class WideResNet(nn.Module):
    """Stem, residual stages, final BN-ReLU, global average pool, linear head."""

    def __init__(self, stem: nn.Sequential, stages: nn.Sequential, features: int,
                 num_classes: int):
        super().__init__()
        self.stem = stem
        self.stages = stages
        self.final_norm = nn.BatchNorm2d(features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = self.pool(torch.relu(self.final_norm(x))).flatten(1)
        return self.fc(x)


def wrn_cifar(*, conv: str = "sc", groups: int = 1, num_classes: int = 10, depth: int = 28,
              widen: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-depth-widen for 32x32 inputs: stages of widths 16k, 32k, 64k and strides 1, 2, 2."""
    positive_int("depth", depth)
    positive_int("widen", widen)
    positive_int("num_classes", num_classes)
    dropout_probability(dropout)
    if (depth - 4) % 6:
        raise ConfigError(f"WRN depth must be 6n+4 (e.g. 16, 22, 28, 40), got {depth}")
    blocks = (depth - 4) // 6
    make = partial(make_conv, conv, groups=groups)
    widths = [16 * widen, 32 * widen, 64 * widen]
    stem = nn.Sequential(StemConv2d(3, 16, 3))
    stages = nn.Sequential(
        _stage(make, 16, widths[0], blocks, 1, dropout),
        _stage(make, widths[0], widths[1], blocks, 2, dropout),
        _stage(make, widths[1], widths[2], blocks, 2, dropout))
    return WideResNet(stem, stages, widths[2], num_classes)


_IMAGENET_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def wrn_imagenet(*, conv: str = "sc", groups: int = 1, num_classes: int = 1000, depth: int = 34,
                 widen: int = 2, dropout: float = 0.0) -> WideResNet:
    """The paper's ImageNet WRN: ResNet-depth basic-block stages with widths 64k..512k."""
    positive_int("widen", widen)
    positive_int("num_classes", num_classes)
    dropout_probability(dropout)
    if depth not in _IMAGENET_BLOCKS:
        raise ConfigError(f"ImageNet WRN depth must be one of {sorted(_IMAGENET_BLOCKS)}, "
                          f"got {depth!r}")
    make = partial(make_conv, conv, groups=groups)
    widths = [64 * widen, 128 * widen, 256 * widen, 512 * widen]
    stem = nn.Sequential(
        StemConv2d(3, 64, 7, stride=2), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1))
    stages, in_channels = [], 64
    for width, blocks, stride in zip(widths, _IMAGENET_BLOCKS[depth], [1, 2, 2, 2]):
        stages.append(_stage(make, in_channels, width, blocks, stride, dropout))
        in_channels = width
    return WideResNet(stem, nn.Sequential(*stages), widths[-1], num_classes)
