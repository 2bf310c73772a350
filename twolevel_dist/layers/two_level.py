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
``representatives_taps`` (one matrix product with k^2 rows per group, then k^2 shifted sums;
about a tenth of the local convolution's time). Both read the same fused weight. On the taps
path the two x-gradients meet in place (``InputGradSum``), and channels-last tensors are read
and written in their own layout, the pixels as the rows of the small matrix products, so neither
layout copies an activation.
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


def _channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` [B, C, H, W] is laid out channels-last (and not also plain contiguous, as
    tensors with one channel or one pixel are)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _pixel_rows(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B*H*W, C], one row per pixel: a view of a channels-last tensor (and of
    the all-gathered representatives, whose pixels are contiguous per channel)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def coarse_correction(coarse_weight: torch.Tensor, representatives: torch.Tensor,
                      local: torch.Tensor | None = None) -> torch.Tensor:
    """A0 applied to the representatives, [O, N] x [B, N, H, W] -> [B, O, H, W] (a 1x1 conv), plus
    ``local`` [B, O, H, W] if given. A (b)addbmm over the batch, so the result is written
    contiguous ([B, O, H*W]) in one pass with no copy of the large tensors, as the layers after it
    (BatchNorm above all) want; einsum and a broadcast matmul return it permuted or copy it.
    A channels-last ``local`` is added to in its own layout, as one [B*H*W, N] x [N, O] product."""
    if local is not None and (local.is_contiguous() or _channels_last(local)):
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
    if _channels_last(grad):
        return (_pixel_rows(representatives).to(grad.dtype).t() @ _pixel_rows(grad)).t()
    flat_grad = grad.reshape(grad.shape[0], grad.shape[1], -1)
    flat_reps = representatives.flatten(2).to(grad.dtype)
    return torch.bmm(flat_reps, flat_grad.transpose(1, 2)).sum(0).t()


class _AddCoarse(Function):
    """local += A0 (representatives), in local's own storage: a convolution's output, which its
    backward does not keep, so no activation-sized tensor is allocated or copied (autograd's
    in-place ops on a view of it would add copies of their own in backward)."""

    @staticmethod
    def forward(ctx, local, coarse_weight, representatives):
        mixing, reps = coarse_weight.to(local.dtype), representatives.to(local.dtype)
        if _channels_last(local):
            _pixel_rows(local).addmm_(_pixel_rows(reps), mixing.t())
        else:
            flat = reps.flatten(2)
            local.view(local.shape[0], local.shape[1], -1).baddbmm_(
                mixing.expand(flat.shape[0], *mixing.shape), flat)
        ctx.mark_dirty(local)
        ctx.save_for_backward(coarse_weight, representatives)
        return local

    @staticmethod
    def backward(ctx, grad):
        coarse_weight, representatives = ctx.saved_tensors
        grad_coarse = coarse_weight_grad(grad, representatives)
        mixing = coarse_weight.to(grad.dtype)
        if _channels_last(grad):
            batch, _, height, width = grad.shape
            grad_reps = (_pixel_rows(grad) @ mixing).view(batch, height, width, -1)
            grad_reps = grad_reps.permute(0, 3, 1, 2)
        else:
            flat_grad = grad.reshape(grad.shape[0], grad.shape[1], -1)   # [B, O, H*W]
            grad_reps = torch.bmm(mixing.t().expand(grad.shape[0], *mixing.t().shape), flat_grad)
            grad_reps = grad_reps.view(representatives.shape)
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
        """The partner's parked gradient (to accumulate into in place), or None."""
        parked, self._parked = self._parked, None
        return parked

    def meet(self, grad: torch.Tensor) -> torch.Tensor | None:
        """What a backward returns for x, given its own gradient: None after parking it if the
        partner has not run yet, otherwise the sum of the two."""
        parked = self.take()
        if parked is None:
            self._parked = grad
            return None
        return parked.add_(grad)


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
            [1, 1], False, [0, 0], groups, [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                            False])
        if grad_x is not None:
            grad_x = ctx.grad_sum.meet(grad_x.to(x.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None, None, None


def _group_rows(t: torch.Tensor, groups: int) -> torch.Tensor | None:
    """The matrices R0's products read from a [B, C, H, W] tensor (x, or its gradient): a view
    [B*G, C/G, H*W] of a contiguous tensor, a view [G, B*H*W, C/G] of a channels-last one;
    None where its memory is laid out neither way."""
    batch, channels, height, width = t.shape
    if t.is_contiguous():
        return t.view(batch * groups, channels // groups, height * width)
    if _channels_last(t):
        return _pixel_rows(t).view(-1, groups, channels // groups).transpose(0, 1)
    return None


class _Representatives(Function):
    """R0 by kernel taps: Y[b, j, t] = w_j[:, t] . x_j[b] (a [k^2, C/N] x [C/N, H*W] matrix product
    per group), then output pixel p sums Y over the k^2 taps at p's shifted positions. It reads x
    once, where a k x k convolution with one filter per group goes through kernels built for many
    filters. The backward places the gradient back onto the taps and does the two matching
    matrix products; it never builds autograd's zero-filled gradient per slice. A channels-last x
    is read in its own layout, its pixels as the rows of one product per group."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, grad_sum):
        groups, per_group, kernel = weight.shape[:3]
        rows = _group_rows(x, groups)
        if rows is None:
            x = x.contiguous()
            rows = _group_rows(x, groups)
        channels_last = _channels_last(x)
        batch, _, height, width = x.shape
        out_hw = ((height + 2 * padding - kernel) // stride + 1,
                  (width + 2 * padding - kernel) // stride + 1)
        taps = weight.reshape(groups, per_group, kernel * kernel)
        if channels_last:            # [G, k^2, B*H*W], viewed as [G, B, k^2, H, W]
            per_tap = torch.bmm(taps.transpose(1, 2), rows.transpose(1, 2))
            per_tap = per_tap.view(groups, -1, batch, height, width).transpose(1, 2)
            out = per_tap.new_zeros(groups, batch, *out_hw)
        else:                        # [B, G, k^2, H, W]
            per_tap = torch.matmul(taps.transpose(1, 2), rows.view(batch, groups, per_group, -1))
            per_tap = per_tap.unflatten(3, (height, width))
            out = per_tap.new_zeros(batch, groups, *out_hw)
        for tap, (out_window, in_window) in enumerate(
                _tap_windows(kernel, stride, padding, (height, width), out_hw)):
            # add_ on the view: ``out[w] += v`` would also write the sum back through __setitem__.
            out[out_window].add_(per_tap[:, :, tap][in_window])
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding
        ctx.grad_sum = grad_sum
        return out.transpose(0, 1) if channels_last else out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        batch, _, height, width = x.shape
        groups, per_group, kernel = weight.shape[:3]
        channels_last = _channels_last(x)
        # Under autocast the gradient may be in a lower precision than the saved tensors.
        compute = grad.dtype
        # Input pixel i gets, through tap t, the gradient of output pixel (i - t + p) / s where
        # that is a whole pixel: spread the gradient out by the stride, zero-pad it by k - 1 - p,
        # and the k^2 windows of the result are the taps' gradients in reversed tap order.
        out_h, out_w = grad.shape[2:]
        spread = grad.reshape(batch * groups, out_h, out_w)
        if stride > 1:
            flat = spread
            spread = grad.new_zeros(batch * groups, stride * (out_h - 1) + 1,
                                    stride * (out_w - 1) + 1)
            spread[:, ::stride, ::stride] = flat
        lead = kernel - 1 - padding              # F.pad crops where this is negative
        padded = F.pad(spread, (lead, width + kernel - 1 - lead - spread.shape[2],
                                lead, height + kernel - 1 - lead - spread.shape[1]))
        windows = _shifted_windows(padded, kernel, (height, width))   # [B*G, k, k, H, W]
        taps = weight.flip((-2, -1)).reshape(groups, per_group, -1).to(compute)  # gradient's order
        rows = _group_rows(x, groups).to(compute)
        if channels_last:     # [G, k^2, B*H*W]: the products run over the pixels as rows
            grad_taps = windows.view(batch, groups, kernel, kernel, height, width)
            grad_taps = grad_taps.permute(1, 2, 3, 0, 4, 5).reshape(groups, kernel ** 2, -1)
            pixel_taps, taps = grad_taps.transpose(1, 2), taps.transpose(1, 2)

            def grad_x_into(out=None):
                return torch.bmm(pixel_taps, taps) if out is None else \
                    out.baddbmm_(pixel_taps, taps)
            grad_weight = torch.bmm(grad_taps, rows)                          # [G, k^2, C/G]
        else:                 # [B*G, k^2, H*W]; one product per image and group
            grad_taps = windows.reshape(batch * groups, kernel * kernel, height * width)
            taps = taps.expand(batch, *taps.shape).reshape(batch * groups, per_group, -1)

            def grad_x_into(out=None):
                return torch.bmm(taps, grad_taps) if out is None else out.baddbmm_(taps, grad_taps)
            grad_weight = torch.bmm(grad_taps, rows.transpose(1, 2))
            grad_weight = grad_weight.view(batch, groups, kernel * kernel, -1).sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            parked = None if ctx.grad_sum is None else ctx.grad_sum.take()
            target = None if parked is None or parked.dtype != compute else \
                _group_rows(parked, groups)
            if target is not None:   # added into the partner's gradient, in place
                grad_x_into(target)
                grad_x = parked
            else:
                fresh = grad_x_into()
                if channels_last:   # [G, B*H*W, C/G] -> [B, G, C/G, H, W]
                    fresh = fresh.view(groups, batch, height, width, per_group)
                    fresh = fresh.permute(1, 0, 4, 2, 3)
                grad_x = fresh.reshape(x.shape).to(x.dtype)
                if parked is not None:  # the partner's gradient in another layout or precision
                    grad_x = parked.add_(grad_x)
                elif ctx.grad_sum is not None:
                    grad_x = ctx.grad_sum.meet(grad_x)
        grad_weight = grad_weight.transpose(1, 2).reshape(weight.shape).flip((-2, -1))
        return grad_x, grad_weight.to(weight.dtype), None, None, None


def _run_eagerly(fn):
    """``torch.compiler.disable(fn)``, applied at the first call: importing torch._dynamo takes
    about a second, which every process (each rank of every job) would pay at start-up, whether
    it compiles or not."""
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)
    return wrapper


@_run_eagerly   # a few small kernels: tracing its k^2 windows only lengthens compiles
def representatives_taps(x: torch.Tensor, rep_weight: torch.Tensor, stride: int, padding: int,
                         grad_sum: InputGradSum | None = None) -> torch.Tensor:
    """R0: x [B, C_in, H, W] with ``rep_weight`` [N, C_in/N, k, k] (group j's representative
    filter) -> [B, N, H', W'], the same as a grouped k x k convolution with one filter per group.
    With ``grad_sum``, its x-gradient meets ``local_convolution``'s there."""
    return _Representatives.apply(x, rep_weight, stride, padding, grad_sum)


@_run_eagerly   # it shares state with representatives_taps between the backwards
def local_convolution(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                      groups: int, grad_sum: InputGradSum) -> torch.Tensor:
    """GC's convolution, F.conv2d(x, weight, stride, padding, groups), whose x-gradient is
    summed with R0's in ``grad_sum``."""
    return _LocalConvolution.apply(x, weight, stride, padding, groups, grad_sum)


def resolve_impl(impl: str, device: torch.device) -> str:
    """"auto": the taps path on CPUs (where it was measured faster), the fused single convolution
    everywhere else (GPUs, and ``meta``, which stands in for them in the tests)."""
    if impl == "auto":
        return "taps" if device.type == "cpu" else "fused"
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
