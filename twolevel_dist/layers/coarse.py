"""GC-2L's coarse level after the representatives: A0, a full 1x1 convolution N -> C_out, and
its weight gradient, shared by every path (single device, fused or taps; the sharded layer).

Written as (b)addbmm over the batch, so that the result is contiguous in one pass with no copy of
the large tensors; channels-last tensors are read and written in their own layout, the pixels as
the rows of the small matrix products.
"""

import torch
from torch.autograd import Function


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` [B, C, H, W] is laid out channels-last (and not also plain contiguous, as
    tensors with one channel or one pixel are)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def pixel_rows(t: torch.Tensor) -> torch.Tensor:
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
    if local is not None and (local.is_contiguous() or is_channels_last(local)):
        return _AddCoarse.apply(local, coarse_weight, representatives)
    flat = representatives.flatten(2)
    mixing = coarse_weight.expand(flat.shape[0], *coarse_weight.shape)
    if local is None:
        out = torch.bmm(mixing, flat)
    else:
        out = torch.baddbmm(local.flatten(2), mixing, flat)
    return out.unflatten(2, representatives.shape[2:])


def coarse_weight_grad(grad: torch.Tensor, representatives: torch.Tensor,
                      coarse_weight: torch.Tensor) -> torch.Tensor:
    """The gradient of A0 [O, N] from the output gradient [B, O, H, W] and the representatives
    [B, N, H, W]: the sum over the batch of [N, H*W] x [H*W, O], in this order because a product
    with N (a handful) output rows is the faster of the two (few output rows, long inner
    dimension: what matrix kernels block best). Returned as ``coarse_weight`` is, its dtype
    (float32 under autocast) and strides, in one copy: autograd and DDP take a gradient laid
    out as its parameter without copying it again (DDP warns every step about one that is not,
    as a transposed [O, 1] would be)."""
    if is_channels_last(grad):
        transposed = pixel_rows(representatives).to(grad.dtype).t() @ pixel_rows(grad)
    else:
        flat_grad = grad.reshape(grad.shape[0], grad.shape[1], -1)
        flat_reps = representatives.flatten(2).to(grad.dtype)
        transposed = torch.bmm(flat_reps, flat_grad.transpose(1, 2)).sum(0)
    return torch.empty_like(coarse_weight).copy_(transposed.t())


def add_coarse_(local: torch.Tensor, coarse_weight: torch.Tensor,
                representatives: torch.Tensor) -> torch.Tensor:
    """local [B, O, H, W] += A0 [O, N] applied to the representatives [B, N, H, W], in place and
    in local's layout (contiguous or channels-last); no autograd (``coarse_correction`` is the
    autograd-aware form)."""
    mixing, reps = coarse_weight.to(local.dtype), representatives.to(local.dtype)
    if is_channels_last(local):
        pixel_rows(local).addmm_(pixel_rows(reps), mixing.t())
    else:
        flat = reps.flatten(2)
        local.view(local.shape[0], local.shape[1], -1).baddbmm_(
            mixing.expand(flat.shape[0], *mixing.shape), flat)
    return local


def representatives_grad(grad: torch.Tensor, coarse_weight: torch.Tensor) -> torch.Tensor:
    """The gradient of the representatives [B, N, H, W] from the output gradient [B, O, H, W]:
    A0 transposed applied to it, read in its own layout (a channels-last gradient as pixel rows,
    no copy of it)."""
    mixing = coarse_weight.to(grad.dtype)
    if is_channels_last(grad):
        batch, _, height, width = grad.shape
        return (pixel_rows(grad) @ mixing).view(batch, height, width, -1).permute(0, 3, 1, 2)
    flat_grad = grad.reshape(grad.shape[0], grad.shape[1], -1)   # [B, O, H*W]
    grad_reps = torch.bmm(mixing.t().expand(grad.shape[0], *mixing.t().shape), flat_grad)
    return grad_reps.view(grad.shape[0], -1, *grad.shape[2:])


class _AddCoarse(Function):
    """local += A0 (representatives), in local's own storage: a convolution's output, which its
    backward does not keep, so no activation-sized tensor is allocated or copied (autograd's
    in-place ops on a view of it would add copies of their own in backward)."""

    @staticmethod
    def forward(ctx, local, coarse_weight, representatives):
        add_coarse_(local, coarse_weight, representatives)
        ctx.mark_dirty(local)
        ctx.save_for_backward(coarse_weight, representatives)
        return local

    @staticmethod
    def backward(ctx, grad):
        coarse_weight, representatives = ctx.saved_tensors
        grad_coarse = coarse_weight_grad(grad, representatives, coarse_weight)
        return (grad, grad_coarse,
                representatives_grad(grad, coarse_weight).to(representatives.dtype))
