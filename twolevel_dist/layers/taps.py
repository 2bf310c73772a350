"""GC-2L's CPU kernel (the "taps" path), behind ``TwoLevelGroupConv2d``'s dispatch
(``resolve_impl``) and tested against the fused path, the reference.

On CPUs the convolution kernels block output channels by 16, so C_out/N + 1 filters per group
cost as much as C_out/N + 16, and a one-filter convolution is no cheaper. This path computes GC's
aligned convolution (``local_convolution``) and gets the representatives from
``representatives_taps``: one matrix product with k^2 rows per group, then k^2 shifted sums, a
small fraction of the local convolution's work (measured: ``benchmarks/layers.py``). Both read
the layer's fused weight. The two x-gradients meet in place (``InputGradSum``), and
channels-last tensors are read and written in their own layout, so neither layout copies an
activation.
"""

import functools

import torch
import torch.nn.functional as F
from torch.autograd import Function

from twolevel_dist.eager import run_eagerly
from twolevel_dist.layers.coarse import is_channels_last, pixel_rows


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
    if is_channels_last(t):
        return pixel_rows(t).view(-1, groups, channels // groups).transpose(0, 1)
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
        channels_last = is_channels_last(x)
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
        channels_last = is_channels_last(x)
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


@run_eagerly   # a few small kernels: tracing its k^2 windows only lengthens compiles
def representatives_taps(x: torch.Tensor, rep_weight: torch.Tensor, stride: int, padding: int,
                         grad_sum: InputGradSum | None = None) -> torch.Tensor:
    """R0: x [B, C_in, H, W] with ``rep_weight`` [N, C_in/N, k, k] (group j's representative
    filter) -> [B, N, H', W'], the same as a grouped k x k convolution with one filter per group.
    With ``grad_sum``, its x-gradient meets ``local_convolution``'s there."""
    return _Representatives.apply(x, rep_weight, stride, padding, grad_sum)


@run_eagerly   # it shares state with representatives_taps between the backwards
def local_convolution(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int,
                      groups: int, grad_sum: InputGradSum) -> torch.Tensor:
    """GC's convolution, F.conv2d(x, weight, stride, padding, groups), whose x-gradient is
    summed with R0's in ``grad_sum``."""
    return _LocalConvolution.apply(x, weight, stride, padding, groups, grad_sum)
