"""MobileNetV2 (Sandler et al.), written for one device. Every 1x1 convolution (expansion,
projection, the final 320->1280) comes from ``make_conv``; the stem and the depthwise 3x3
convolutions stay as they are.

With ``conv="gc2l"`` the final 320->1280 convolution is a plain group convolution unless
``coarse_last_conv=True``: that is the variant whose parameter counts match the paper's Table 4
(2.47M / 1.95M / 1.72M at N = 2 / 4 / 8); giving it a coarse level too adds 0.003-0.011M.

``small_input=True`` adapts the strides to 32x32 images (CIFAR), as is usual: the stem and the
second stage keep stride 1, so the last feature map is 4x4 instead of 1x1. The parameters are
the same; only the compute per image changes.
"""

import torch
import torch.nn as nn

from twolevel_dist.layers import DepthwiseConv2d, StemConv2d, make_conv
from twolevel_dist.validate import dropout_probability, positive_int, positive_number

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
_INVERTED_RESIDUAL_SETTING = [
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never dropping more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(conv: nn.Module, channels: int, activation: bool) -> list[nn.Module]:
    return [conv, nn.BatchNorm2d(channels)] + ([nn.ReLU6(inplace=True)] if activation else [])


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6]-depthwise3x3-BN-ReLU6-1x1 project-BN, residual when shapes match."""

    def __init__(self, conv_kind: str, groups: int, in_channels: int, out_channels: int,
                 stride: int, expansion: int):
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_bn(make_conv(conv_kind, in_channels, hidden, 1, groups=groups),
                               hidden, True)
        layers += _conv_bn(DepthwiseConv2d(hidden, 3, stride), hidden, True)
        layers += _conv_bn(make_conv(conv_kind, hidden, out_channels, 1, groups=groups),
                           out_channels, False)
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, *, conv: str = "sc", groups: int = 1, num_classes: int = 1000,
                 width_mult: float = 1.0, dropout: float = 0.2, coarse_last_conv: bool = False,
                 small_input: bool = False):
        super().__init__()
        positive_number("width_mult", width_mult)
        positive_int("num_classes", num_classes)
        dropout_probability(dropout)
        in_channels = make_divisible(32 * width_mult)
        last_channels = make_divisible(1280 * max(1.0, width_mult))
        stem_stride = 1 if small_input else 2
        layers: list[nn.Module] = _conv_bn(StemConv2d(3, in_channels, 3, stride=stem_stride),
                                           in_channels, True)
        for stage, (expansion, channels, repeats, stride) in enumerate(_INVERTED_RESIDUAL_SETTING):
            if small_input and stage == 1:
                stride = 1              # 32x32 inputs: the 24-channel stage keeps the resolution
            out_channels = make_divisible(channels * width_mult)
            for i in range(repeats):
                layers.append(InvertedResidual(conv, groups, in_channels, out_channels,
                                               stride if i == 0 else 1, expansion))
                in_channels = out_channels
        last_kind = "gc" if conv == "gc2l" and not coarse_last_conv else conv
        layers += _conv_bn(make_conv(last_kind, in_channels, last_channels, 1, groups=groups),
                           last_channels, True)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last_channels, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))
