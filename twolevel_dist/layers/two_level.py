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
the "fused" path, used on GPUs. On CPUs the convolution kernels block output channels by 16, so
C_out/N + 1 filters per group cost as much as C_out/N + 16, and a one-filter convolution is no
cheaper; the "taps" path computes GC's aligned convolution and gets the representatives from
``representatives_taps`` (one small matrix product per kernel tap, about a tenth of the local
convolution's time). Both read the same fused weight.
"""


import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Function

from twolevel_dist.errors import ConfigError
from twolevel_dist.layers.checks import GroupedConvGeometry
from twolevel_dist.layers.init import he_normal_


IMPLEMENTATIONS = ("auto", "fused", "taps")


def coarse_correction(coarse_weight: torch.Tensor, representatives: torch.Tensor,
                      local: torch.Tensor | None = None) -> torch.Tensor:
    """A0 applied to the representatives, [O, N] x [B, N, H, W] -> [B, O, H, W] (a 1x1 conv), plus
    ``local`` [B, O, H, W] if given. A (b)addbmm over the batch, so the result is written
    contiguous ([B, O, H*W]) in one pass with no copy of the large tensors, as the layers after it
    (BatchNorm above all) want; einsum and a broadcast matmul return it permuted or copy it."""
    if local is not None and local.is_contiguous():
        return _AddCoarse.apply(local, coarse_weight, representatives)
    flat = representatives.flatten(2)
    mixing = coarse_weight.expand(flat.shape[0], *coarse_weight.shape)
    if local is None:
        out = torch.bmm(mixing, flat)
    else:
        out = torch.baddbmm(local.flatten(2), mixing, flat)
    return out.unflatten(2, representatives.shape[2:])


def coarse_weight_grad(grad: torch.Tensor, representatives: torch.Tensor) -> torch.Tensor:
    """The gradient of A0 [O, N] from the output gradient [B, O, H, W] and the representatives
    [B, N, H, W]: the sum over the batch of [N, H*W] x [H*W, O], in this order because a product
    with N (a handful) output rows runs about twice as fast as one with N output columns."""
    flat_grad = grad.reshape(grad.shape[0], grad.shape[1], -1)
    flat_reps = representatives.flatten(2).to(grad.dtype)
    return torch.bmm(flat_reps, flat_grad.transpose(1, 2)).sum(0).t()


class _AddCoarse(Function):
    """local += A0 (representatives), in local's own storage: a convolution's output, which its
    backward does not keep, so no activation-sized tensor is allocated or copied (autograd's
    in-place ops on a view of it would add copies of their own in backward)."""

    @staticmethod
    def forward(ctx, local, coarse_weight, representatives):
        flat = representatives.flatten(2)
        mixing = coarse_weight.expand(flat.shape[0], *coarse_weight.shape)
        local.view(local.shape[0], local.shape[1], -1).baddbmm_(mixing.to(local.dtype),
                                                                 flat.to(local.dtype))
        ctx.mark_dirty(local)
        ctx.save_for_backward(coarse_weight, representatives)
        return local

    @staticmethod
    def backward(ctx, grad):
        coarse_weight, representatives = ctx.saved_tensors
        flat_grad = grad.reshape(grad.shape[0], grad.shape[1], -1)       # [B, O, H*W]
        grad_coarse = coarse_weight_grad(grad, representatives)
        mixing = coarse_weight.t().to(grad.dtype).expand(grad.shape[0], *coarse_weight.t().shape)
        grad_reps = torch.bmm(mixing, flat_grad).view_as(representatives)
        return (grad, grad_coarse.to(coarse_weight.dtype),
                grad_reps.to(representatives.dtype))


def _shifted_windows(padded: torch.Tensor, kernel: int, out_hw) -> torch.Tensor:
    """The k x k windows of ``padded`` [M, Hp, Wp] as a view [M, k, k, H', W']: entry
    (m, dy, dx, y, x) is padded[m, y + dy, x + dx]. No loop and no copy."""
    rows, cols = padded.shape[1:]
    return padded.as_strided((padded.shape[0], kernel, kernel, *out_hw),
                             (rows * cols, cols, 1, cols, 1))


@functools.lru_cache(maxsize=None)
def _tap_windows(kernel: int, stride: int, padding: int, in_hw: tuple, out_hw: tuple) -> tuple:
    """For each kernel tap: (output window, input window), the output pixels whose receptive
    field puts this tap inside the image and the input pixels it reads there (padding reads
    zeros, so it is simply left out). Cached: a network has a handful of geometries."""
    windows = []
    for tap in range(kernel * kernel):
        out_slices, in_slices = [], []
        for offset, size_in, size_out in zip(divmod(tap, kernel), in_hw, out_hw):
            first = max(0, -((offset - padding) // stride))           # ceil((p - offset) / s)
            last = min(size_out - 1, (size_in - 1 - offset + padding) // stride)
            if last < first:                   # this tap never lands inside the image
                out_slices.append(slice(0, 0))
                in_slices.append(slice(0, 0))
                continue
            start = first * stride + offset - padding
            out_slices.append(slice(first, last + 1))
            in_slices.append(slice(start, start + (last - first) * stride + 1, stride))
        windows.append(((..., *out_slices), (..., *in_slices)))
    return tuple(windows)


class InputGradSum:
    """The x-gradient of the local convolution and of R0, which read the same x, summed in place:
    the first of the two backwards to run parks its gradient here and returns none for x, the
    second adds its own into it and returns the sum. That saves autograd's separate add, a full
    pass over x per layer. Correct in either order; in the layers' order (R0's backward runs
    after the convolution's) R0 accumulates its matrix product straight into the convolution's
    gradient. Both outputs must reach the loss, as they do in GC-2L (A0 mixes every
    representative into the output): a gradient parked by a backward whose partner never runs
    would be lost."""

    def __init__(self):
        self._parked = None

    def take(self) -> torch.Tensor | None:
        parked, self._parked = self._parked, None
        return parked

    def park(self, grad: torch.Tensor) -> None:
        self._parked = grad


class _LocalConvolution(Function):
    """F.conv2d whose x-gradient goes through an ``InputGradSum``."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, groups, grad_sum):
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding, groups
        ctx.grad_sum = grad_sum
        return F.conv2d(x, weight, None, stride, padding, 1, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, groups = ctx.geometry
        # Under autocast the convolution ran in the gradient's (lower) precision.
        grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
            grad, x.to(grad.dtype), weight.to(grad.dtype), None, [stride] * 2, [padding] * 2,
            [1, 1], False, [0, 0], groups, [ctx.needs_input_grad[0], True, False])
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
            parked = ctx.grad_sum.take()
            if parked is None:
                ctx.grad_sum.park(grad_x)
                grad_x = None
            else:
                grad_x.add_(parked)
        return grad_x, grad_weight.to(weight.dtype), None, None, None, None


class _Representatives(Function):
    """R0 by kernel taps: Y[b, j, t] = w_j[:, t] . x_j[b] (a [k^2, C/N] x [C/N, H*W] matrix product
    per group), then output pixel p sums Y over the k^2 taps at p's shifted positions. It reads x
    once, where a k x k convolution with one filter per group goes through kernels built for many
    filters. The backward places the gradient back onto the taps and does the two matching
    matrix products; it never builds autograd's zero-filled gradient per slice."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, grad_sum):
        batch, _, height, width = x.shape
        groups, per_group, kernel = weight.shape[:3]
        out_hw = ((height + 2 * padding - kernel) // stride + 1,
                  (width + 2 * padding - kernel) // stride + 1)
        taps = weight.reshape(groups, per_group, kernel * kernel).transpose(1, 2)
        per_tap = torch.matmul(taps, x.reshape(batch, groups, per_group, height * width))
        per_tap = per_tap.unflatten(3, (height, width))                  # [B, N, k^2, H, W]
        out = per_tap.new_zeros(batch, groups, *out_hw)
        for tap, (out_window, in_window) in enumerate(
                _tap_windows(kernel, stride, padding, (height, width), out_hw)):
            # add_ on the view: ``out[w] += v`` would also write the sum back through __setitem__.
            out[out_window].add_(per_tap[:, :, tap][in_window])
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding
        ctx.grad_sum = grad_sum
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        batch, _, height, width = x.shape
        groups, per_group, kernel = weight.shape[:3]
        # Under autocast the gradient may be in a lower precision than the saved tensors.
        compute = grad.dtype
        # Input pixel i gets, through tap t, the gradient of output pixel (i - t + p) / s where
        # that is a whole pixel: spread the gradient out by the stride, zero-pad it by k - 1 - p,
        # and the k^2 windows of the result are the taps' gradients in reversed tap order.
        out_h, out_w = grad.shape[2:]
        spread = grad.reshape(batch * groups, out_h, out_w)
        if stride > 1:
            spread = grad.new_zeros(batch * groups, stride * (out_h - 1) + 1,
                                    stride * (out_w - 1) + 1)
            spread[:, ::stride, ::stride] = grad.reshape(batch * groups, out_h, out_w)
        lead = kernel - 1 - padding              # F.pad crops where this is negative
        padded = F.pad(spread, (lead, width + kernel - 1 - lead - spread.shape[2],
                                lead, height + kernel - 1 - lead - spread.shape[1]))
        grad_taps = _shifted_windows(padded, kernel, (height, width)).reshape(
            batch * groups, kernel * kernel, height * width)
        flipped = weight.flip((-2, -1))              # the taps in the gradient's order
        grad_x = None
        if ctx.needs_input_grad[0]:
            parked = None if ctx.grad_sum is None else ctx.grad_sum.take()
            # [B*N, C/N, k^2] x [B*N, k^2, H*W], added into the partner's gradient if it is there.
            taps = flipped.reshape(groups, per_group, kernel * kernel)
            taps = taps.expand(batch, *taps.shape).reshape(batch * groups, per_group, -1)
            if parked is None:
                grad_x = torch.bmm(taps.to(compute), grad_taps).view(x.shape).to(x.dtype)
                if ctx.grad_sum is not None:
                    ctx.grad_sum.park(grad_x)
                    grad_x = None
            else:
                parked.view(batch * groups, per_group, -1).baddbmm_(taps.to(parked.dtype),
                                                                    grad_taps.to(parked.dtype))
                grad_x = parked
        inputs = x.to(compute).reshape(batch, groups, per_group, height * width)
        grad_weight = torch.matmul(grad_taps.view(batch, groups, kernel * kernel, -1),
                                   inputs.transpose(2, 3)).sum(0)            # [G, k^2, C/N]
        grad_weight = grad_weight.transpose(1, 2).reshape(weight.shape).flip((-2, -1))
        return grad_x, grad_weight.to(weight.dtype), None, None, None


@torch.compiler.disable   # a few small kernels: tracing its k^2 windows only lengthens compiles
def representatives_taps(x: torch.Tensor, rep_weight: torch.Tensor, stride: int, padding: int,
                         grad_sum: InputGradSum | None = None) -> torch.Tensor:
    """R0: x [B, C_in, H, W] with ``rep_weight`` [N, C_in/N, k, k] (group j's representative
    filter) -> [B, N, H', W'], the same as a grouped k x k convolution with one filter per group.
    With ``grad_sum``, its x-gradient meets ``local_convolution``'s there."""
    return _Representatives.apply(x, rep_weight, stride, padding, grad_sum)


@torch.compiler.disable   # it shares state with representatives_taps between the backwards
def local_convolution(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                      groups: int, grad_sum: InputGradSum) -> torch.Tensor:
    """GC's convolution, F.conv2d(x, weight, stride, padding, groups), whose x-gradient is
    summed with R0's in ``grad_sum``."""
    return _LocalConvolution.apply(x, weight, stride, padding, groups, grad_sum)


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto": the fused single convolution on GPUs, the taps path elsewhere."""
    if impl == "auto":
        return "fused" if device.type == "cuda" else "taps"
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
        grad_sum = InputGradSum()
        local = local_convolution(x, self.weight[:, :local_out].flatten(0, 1), self.stride,
                                  self.padding, self.groups, grad_sum)
        representatives = representatives_taps(x, self.weight[:, local_out], self.stride,
                                               self.padding, grad_sum)
        return coarse_correction(self.coarse_weight, representatives, local)
