"""Fully learnable group convolution (FLGC, Wang et al., CVPR 2019).

Which group each input channel and each filter belongs to is learned. Each has a row of logits
over the N groups; the forward pass uses the hard one-hot argmax, the backward pass the softmax's
gradient (straight-through estimator). Filter o sees input channel i iff both are in the same group,
so the convolution is a dense one masked by ``hard_out @ hard_in^T``.

The dense weight is kept (a channel may move to any group), but only the connections inside groups
are active: ``num_effective_parameters`` counts those plus the logits, which is what the layer costs
once deployed as a permuted group convolution, and what the paper reports (equal to ``gc`` when the
groups are balanced, as they are at initialisation).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from twolevel_dist.layers.checks import GroupedConvGeometry
from twolevel_dist.layers.init import he_normal_

# Initial logit of a channel's own group (others 0): the argmax is the initial partition, while
# the softmax stays soft enough (p ~ 0.73 for N=2) for the logits to receive useful gradients.
_INITIAL_MARGIN = 1.0


def straight_through_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """Hard one-hot of the row-wise argmax in the forward pass; softmax gradient in the backward."""
    soft = logits.softmax(dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


def _balanced_random_partition(channels: int, groups: int) -> torch.Tensor:
    """Group index of each channel: every group gets channels/groups, in a random order."""
    return torch.arange(channels).remainder(groups)[torch.randperm(channels)]


class FullyLearnableGroupConv2d(GroupedConvGeometry):
    """``flgc``: learned input-channel and filter assignments to N groups."""

    kind = "flgc"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride, groups)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.in_assign_logits = nn.Parameter(torch.empty(in_channels, groups))
        self.out_assign_logits = nn.Parameter(torch.empty(out_channels, groups))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        he_normal_(self.weight, fan_in=self.in_channels // self.groups * self.kernel_size ** 2)
        # A random balanced partition: the layer starts as a group convolution of permuted
        # channels (so the contiguous channel blocks are already coupled, unlike plain GC).
        with torch.no_grad():
            for logits in (self.in_assign_logits, self.out_assign_logits):
                assignment = _balanced_random_partition(logits.shape[0], self.groups)
                logits.copy_(F.one_hot(assignment, self.groups) * _INITIAL_MARGIN)

    def connectivity(self) -> torch.Tensor:
        """[C_out, C_in] mask, 1 where filter and input channel share a group (straight-through)."""
        return (straight_through_one_hot(self.out_assign_logits)
                @ straight_through_one_hot(self.in_assign_logits).t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.connectivity()[:, :, None, None]
        return F.conv2d(x, weight, None, self.stride, self.padding)

    @torch.no_grad()
    def num_effective_parameters(self) -> int:
        active = int(self.connectivity().sum().item()) * self.kernel_size ** 2
        return active + self.in_assign_logits.numel() + self.out_assign_logits.numel()
