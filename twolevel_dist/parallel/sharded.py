"""One rank's shard of each replaceable layer, and of the classifier head.

Each module keeps the parameter names of its single-device original, holding the slice that rank j
owns; ``SHARD_DIMS`` names the dimension of the full tensor it was cut from (``None``: replicated).
Each parameter is a copy of the slice it is given, in the slice's device, dtype and memory format.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from twolevel_dist.layers import (
    InputGradSum,
    add_coarse_,
    coarse_correction,
    coarse_weight_grad,
    is_channels_last,
    local_convolution,
    representatives_grad,
    representatives_taps,
    resolve_impl,
)
from twolevel_dist.parallel import ops
from twolevel_dist.parallel.collectives import (
    channels_to_stacked,
    exchange_chunks,
    gather_channels,
    stacked_to_channels,
    start_gather_channels,
    sum_over_ranks,
)


class _CoarseExchange(Function):
    """GC-2L's exchange on one rank, on the fused convolution's output [B, C_out/N + 1, H, W]:
    all-gather the last channel (the representative) over the group, apply this rank's rows of A0
    ([C_out/N, N]) and add them to the other channels. One Function, so that backward builds the
    fused gradient with one concatenation instead of autograd's zero-filled slice gradients."""

    @staticmethod
    def forward(ctx, fused, coarse_weight, key):
        local_out, world = fused.shape[1] - 1, ops.world_size(key)
        gathered = ops.all_gather(fused[:, local_out:], key)       # [N B, 1, H, W], contiguous
        representatives = stacked_to_channels(gathered.unflatten(0, (world, fused.shape[0])))
        # A contiguous copy (B x N x H x W, small): what the bmm wants.
        representatives = representatives.clone(memory_format=torch.contiguous_format)
        ctx.save_for_backward(coarse_weight, representatives)
        ctx.key = key
        # The output is a copy of the local channels in the input's layout (channels-last stays
        # channels-last), A0's correction added to it in place.
        local = fused[:, :local_out].clone(memory_format=layout(fused))
        return add_coarse_(local, coarse_weight, representatives)

    @staticmethod
    def backward(ctx, grad):
        # Under autocast the forward ran in the gradient's (lower) precision; A0 is stored in
        # float32 and gets its gradient in float32.
        coarse_weight, representatives = ctx.saved_tensors
        grad_coarse = coarse_weight_grad(grad, representatives, coarse_weight)
        grad_representatives = representatives_grad(grad, coarse_weight)
        world = representatives.shape[1]
        own = ops.reduce_scatter(channels_to_stacked(grad_representatives, world), ctx.key)
        batch, local_out, height, width = grad.shape
        grad_fused = torch.empty((batch, local_out + 1, height, width), dtype=grad.dtype,
                                 device=grad.device, memory_format=layout(grad))
        grad_fused[:, :local_out] = grad
        grad_fused[:, local_out:] = own
        return grad_fused, grad_coarse, None


def layout(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format


def coarse_exchange(fused: torch.Tensor, coarse_weight: torch.Tensor, group) -> torch.Tensor:
    """local + A0 (all-gathered representatives), from the fused output [B, C_out/N + 1, H, W];
    ``group``: a process group or its key (``ops.group_key``)."""
    key = ops.group_key(group)
    if ops.world_size(key) == 1:
        local_out = fused.shape[1] - 1
        return fused[:, :local_out] + coarse_correction(coarse_weight, fused[:, local_out:])
    return _CoarseExchange.apply(fused, coarse_weight, key)


def resolve_overlap(overlap: bool | None, device: torch.device) -> bool:
    """``conv.overlap`` unset (None): on for CPU ranks, where the taps path with the all-gather
    overlapped was faster in every measured case; off elsewhere, so that GPUs run the fused
    convolution (one cuDNN call) and NCCL's own collectives."""
    return device.type == "cpu" if overlap is None else overlap


def own_copy(tensor: torch.Tensor) -> nn.Parameter:
    """A parameter holding a copy of ``tensor`` (a slice of the single-device parameter) in its
    device, dtype and memory format."""
    return nn.Parameter(tensor.detach().clone())


class _ShardedConv(nn.Module):
    """Common state: this rank's weight slice, stride, padding and the gp process group."""

    SHARD_DIMS = {"weight": 0}

    def __init__(self, weight: torch.Tensor, stride: int, padding: int, group):
        super().__init__()
        self.weight = own_copy(weight)
        self.stride, self.padding, self.group = stride, padding, group
        self.key = ops.group_key(group)     # what the collectives take (a plain int: compilable)
        self.world = ops.world_size(self.key)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, stride={self.stride}"


class ShardedTwoLevelConv2d(_ShardedConv):
    """GC-2L on rank j: the local output (C_out/N filters) and the representative channel (one
    filter), an all-gather of the representatives (B x 1 x H x W per rank), this rank's rows of A0
    applied to them, added to the local output.

    Two ways to compute the two convolutions, as on one device (``impl``): "fused", one dense
    convolution of C_out/N + 1 filters (GPUs), or "taps", the local convolution beside
    ``representatives_taps`` (CPUs, where the extra filter costs as much as 16). ``overlap=True``
    (always the taps structure) computes the representative first, starts its all-gather, runs
    the local convolution while it travels, then waits; backward overlaps the reduce-scatter with
    the local convolution's backward the same way. ``overlap=None`` chooses by the weight's
    device (``resolve_overlap``)."""

    SHARD_DIMS = {"weight": 0, "coarse_weight": 0}

    def __init__(self, weight, coarse_weight, stride, padding, group,
                 overlap: bool | None = None, impl: str = "auto"):
        super().__init__(weight, stride, padding, group)   # weight: [1, C_out/N + 1, C_in/N, k, k]
        self.coarse_weight = own_copy(coarse_weight)   # [C_out/N, N]
        self.local_out = self.weight.shape[1] - 1
        self.overlap, self.impl = resolve_overlap(overlap, weight.device), impl

    def _representative(self, x: torch.Tensor, grad_sum: InputGradSum) -> torch.Tensor:
        """This rank's representative channel, [B, 1, H', W']."""
        return representatives_taps(x, self.weight[:, self.local_out], self.stride, self.padding,
                                    grad_sum)

    def _local(self, x: torch.Tensor, grad_sum: InputGradSum) -> torch.Tensor:
        return local_convolution(x, self.weight[0, : self.local_out], self.stride, self.padding,
                                 1, grad_sum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.overlap and resolve_impl(self.impl, x.device) == "fused":
            # squeeze, not [0]: its backward is a view of the gradient, where select's writes
            # it into a zero-filled weight-sized tensor (two more kernels per layer).
            fused = F.conv2d(x, self.weight.squeeze(0), None, self.stride, self.padding)
            return coarse_exchange(fused, self.coarse_weight, self.key)
        grad_sum = InputGradSum()
        if self.overlap:
            stacked, pending = start_gather_channels(self._representative(x, grad_sum),
                                                     self.group)
            local = self._local(x, grad_sum)
            representatives = pending.wait(stacked)
        else:
            representatives = gather_channels(self._representative(x, grad_sum), self.key)
            local = self._local(x, grad_sum)
        return coarse_correction(self.coarse_weight, representatives, local)


class ShardedGroupConv2d(_ShardedConv):
    """GC on rank j: a dense convolution of the local channels. No communication."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding)


class ShardedShuffleConv2d(ShardedGroupConv2d):
    """Shuffle on rank j: GC, then an all-to-all of the whole activation so that rank j ends up
    with output channels j*C/N ... (j+1)*C/N of the shuffled tensor. Needs N to divide C_out/N."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = super().forward(x)                                   # pre-shuffle block j
        batch, channels = local.shape[:2]
        # Local channel a goes to shuffled position a*N + j, owned by rank a // (C/N^2).
        outgoing = local.unflatten(1, (self.world, channels // self.world)).movedim(1, 0)
        incoming = exchange_chunks(outgoing, self.key)     # [N (source b), B, C/N^2, H, W]
        # Received from rank b: local position a'*N + b of the shuffled block.
        return incoming.permute(1, 2, 0, 3, 4).flatten(1, 2)


class SplitStandardConv2d(_ShardedConv):
    """SC split by output channels (the paper's "naive model parallelism" for SC): all-gather
    the whole input, then compute this rank's C_out/N output channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(gather_channels(x, self.key), self.weight, None, self.stride,
                        self.padding)


class ShardedLinearHead(nn.Module):
    """The classifier on rank j: its column slice of the weight on its C/N pooled features, one
    all-reduce (sum) of the partial logits, then the bias. The bias is replicated and added after
    the sum, so its gradient is the same on every rank and the copies never drift."""

    SHARD_DIMS = {"weight": 1, "bias": None}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group):
        super().__init__()
        self.weight = own_copy(weight)
        self.bias = None if bias is None else own_copy(bias)
        self.group, self.key = group, ops.group_key(group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = sum_over_ranks(F.linear(x, self.weight), self.key)
        # In the logits' dtype, as nn.Linear's bias under autocast (not promoted to float32).
        return logits if self.bias is None else logits + self.bias.to(logits.dtype)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}"
