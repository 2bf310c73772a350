"""Two-level group convolution (GC-2L), single device.

    y = GC(x) + A0(R0(x))

R0 maps group j of the input to one representative channel with a k x k convolution of the
layer's own stride (a group convolution C_in -> N); A0 is a full 1x1 convolution N -> C_out
(``coarse``). With A0 = 0 the layer is exactly ``gc``.

Parameters are held in the layout the ranks use, so that sharding is a slice:
  weight        [N, C_out/N + 1, C_in/N, k, k]  group j's C_out/N local filters, then its
                                                 representative filter (row C_out/N)
  coarse_weight [C_out, N]                       A0; rank j owns rows j*C_out/N ... (j+1)*C_out/N
Because the local filters and the representative filter of a group share input, kernel and
stride, one grouped convolution computes all of them (C_out + N output channels) in one launch:
the "fused" path, the reference, used on GPUs. CPUs take the "taps" kernel (``taps``), which
reads the same weight; ``resolve_impl`` is the one dispatch.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers.checks import GroupedConvGeometry
from twolevel_dist.layers.coarse import coarse_correction, is_channels_last
from twolevel_dist.layers.init import he_normal_
from twolevel_dist.layers.taps import InputGradSum, local_convolution, representatives_taps

IMPLEMENTATIONS = ("auto", "fused", "taps")


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto": the taps path on CPUs (where it was measured faster), the fused single convolution
    everywhere else (GPUs, and ``meta``, which stands in for them in the tests)."""
    if impl == "auto":
        return "taps" if device.type == "cpu" else "fused"
    return impl


def local_channels(fused: torch.Tensor, groups: int, local_out: int) -> torch.Tensor:
    """The local filters' outputs [B, N C_out/N, H, W] of the fused convolution's output
    [B, N (C_out/N + 1), H, W], copied out in its layout (channels-last stays channels-last); a
    copy also where one group would make it a view, since the coarse correction is added to it
    in place."""
    if is_channels_last(fused):
        pixels = fused.permute(0, 2, 3, 1).unflatten(3, (groups, local_out + 1))
        return pixels[..., :local_out].flatten(3, 4).contiguous().permute(0, 3, 1, 2)
    return fused.unflatten(1, (groups, local_out + 1))[:, :, :local_out].flatten(1, 2).contiguous()


class TwoLevelGroupConv2d(GroupedConvGeometry):
    """``gc2l``: group convolution plus the coarse level (one representative channel per group)."""

    kind = "gc2l"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, impl: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups)
        if impl not in IMPLEMENTATIONS:
            raise ConfigError(f"gc2l: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(
            groups, out_channels // groups + 1, in_channels // groups, kernel_size, kernel_size))
        self.coarse_weight = nn.Parameter(torch.empty(out_channels, groups))
        self.reset_parameters()

    @property
    def local_out_channels(self) -> int:
        return self.out_channels // self.groups

    def reset_parameters(self) -> None:
        # Local and representative filters: He-normal over their fan-in, like the GC they extend.
        he_normal_(self.weight, fan_in=self.in_channels // self.groups * self.kernel_size ** 2)
        # A0 starts at zero: the layer starts as exactly the GC it extends and the coarse level
        # grows from there (A0's gradient is nonzero from the first step, the representative
        # filters' from the second). A random A0 adds, on every output channel, a mix of the same
        # N signals as large as the GC output itself; at small N that common part trained worse
        # than GC alone (README, "Accuracy against N").
        nn.init.zeros_(self.coarse_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local_out = self.local_out_channels
        if resolve_impl(self.impl, x.device) == "fused":
            fused = F.conv2d(x, self.weight.flatten(0, 1), None, self.stride, self.padding, 1,
                             self.groups)                     # [B, N (C_out/N + 1), H, W]
            representatives = fused.unflatten(1, (self.groups, local_out + 1))[:, :, local_out]
            local = local_channels(fused, self.groups, local_out)
            return coarse_correction(self.coarse_weight, representatives, local)
        grad_sum = InputGradSum()
        local = local_convolution(x, self.weight[:, :local_out].flatten(0, 1), self.stride,
                                  self.padding, self.groups, grad_sum)
        representatives = representatives_taps(x, self.weight[:, local_out], self.stride,
                                               self.padding, grad_sum)
        return coarse_correction(self.coarse_weight, representatives, local)
