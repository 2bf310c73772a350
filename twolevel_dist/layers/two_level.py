"""Two-level group convolution (GC-2L), single device.

    y = GC(x) + A0(R0(x))

R0 maps group j of the input to one representative channel with a k x k convolution of the
layer's own stride (a group convolution C_in -> N); A0 is a full 1x1 convolution N -> C_out.
With A0 = 0 the layer is exactly ``gc``.

Parameters are held in the layout the ranks use, so that sharding is a slice:
  weight        [N, C_out/N + 1, C_in/N, k, k]  group j's C_out/N local filters, then its
                                                 representative filter (row C_out/N)
  coarse_weight [C_out, N]                       A0; rank j owns rows j*C_out/N ... (j+1)*C_out/N
Because the local filters and the representative filter of a group share input, kernel and
stride, one grouped convolution can compute all of them (C_out + N output channels) in one launch:
the "fused" path, used on GPUs. On CPUs the grouped kernels for C_out/N + 1 filters per group are
much slower than for C_out/N (its backward above all), so the "depthwise" path computes GC's aligned
convolution and gets each representative channel from a depthwise convolution summed over its
group's channels (the same k x k sums, and cheap kernels). Both read the same fused weight.
"""


import torch
import torch.nn as nn
import torch.nn.functional as F

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers.checks import GroupedConvGeometry
from twolevel_dist.layers.init import he_normal_


IMPLEMENTATIONS = ("auto", "fused", "depthwise")


def coarse_correction(coarse_weight: torch.Tensor, representatives: torch.Tensor) -> torch.Tensor:
    """A0 applied to the representatives: [O, N] x [B, N, H, W] -> [B, O, H, W] (a 1x1 conv).
    A bmm over the batch, so the result is written contiguous ([B, O, H*W]) with no copy of the
    large tensors, as the layers after it (BatchNorm above all) want; einsum and a broadcast
    matmul return it permuted or copy it."""
    flat = representatives.flatten(2)
    out = torch.bmm(coarse_weight.expand(flat.shape[0], *coarse_weight.shape), flat)
    return out.unflatten(2, representatives.shape[2:])


def representatives_depthwise(x: torch.Tensor, rep_weight: torch.Tensor, stride: int,
                              padding: int) -> torch.Tensor:
    """R0 as a depthwise convolution summed within each group: x [B, C_in, H, W] with
    ``rep_weight`` [N, C_in/N, k, k] (group j's representative filter) -> [B, N, H', W']."""
    groups, per_group = rep_weight.shape[:2]
    depthwise = F.conv2d(x, rep_weight.reshape(groups * per_group, 1, *rep_weight.shape[2:]),
                         None, stride, padding, 1, groups * per_group)
    return depthwise.unflatten(1, (groups, per_group)).sum(2)


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto": the fused single convolution on GPUs, the depthwise path elsewhere."""
    if impl == "auto":
        return "fused" if device.type == "cuda" else "depthwise"
    return impl


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
        # A0 is a linear mix of N channels added to the GC output: unit gain keeps the coarse
        # term's variance comparable to one representative's rather than N times larger.
        he_normal_(self.coarse_weight, fan_in=self.groups, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local_out = self.local_out_channels
        if resolve_impl(self.impl, x.device) == "fused":
            fused = F.conv2d(x, self.weight.flatten(0, 1), None, self.stride, self.padding, 1,
                             self.groups)
            fused = fused.unflatten(1, (self.groups, local_out + 1))  # [B, N, C_out/N + 1, H, W]
            local, representatives = fused[:, :, :local_out], fused[:, :, local_out]
            coarse = coarse_correction(self.coarse_weight, representatives)  # [B, C_out, H, W]
            return (coarse.unflatten(1, (self.groups, local_out)) + local).flatten(1, 2)
        local = F.conv2d(x, self.weight[:, :local_out].flatten(0, 1), None, self.stride,
                         self.padding, 1, self.groups)
        representatives = representatives_depthwise(x, self.weight[:, local_out], self.stride,
                                                    self.padding)
        return local + coarse_correction(self.coarse_weight, representatives)
