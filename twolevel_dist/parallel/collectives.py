"""Autograd-aware collectives: every collective is a small autograd Function whose backward is
the matching collective (Megatron-LM's ``mappings.py`` pattern). How the bytes travel, and their
counting, live in ``transport`` and ``counters``.

- ``gather_channels``        forward all-gather along the channel dim; backward reduce-scatter
                             (sum), because every rank's A0 rows read every rank's representative.
- ``start_gather_channels``  the same, started without waiting (``pending.wait`` completes it), so
                             that local compute overlaps the all-gather; its backward overlaps the
                             reduce-scatter likewise.
- ``sum_over_ranks``         forward all-reduce (sum); backward identity: every rank computes the
                             same loss from the same logits, so each already holds the full
                             gradient.
- ``exchange_chunks``        forward all-to-all of equal chunks along dim 0; backward the same
                             all-to-all (it is its own adjoint in that layout).

A size-1 group skips communication. ``group`` is a process group or its key (``ops.group_key``,
what the sharded modules pass). The synchronous collectives travel as custom operators (``ops``),
which ``torch.compile`` keeps in its graph; the asynchronous pair behind ``overlap`` holds a
handle between two Functions that no graph can carry, so it runs eagerly (a graph break) and
compiled models use the synchronous exchange (``prepare_for_compile``).
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from twolevel_dist.eager import run_eagerly
from twolevel_dist.parallel import ops
from twolevel_dist.parallel.transport import (
    ProcessGroup,
    all_gather_flat_buffer,
    reduce_scatter_dim0,
)


def stacked_to_channels(stacked: torch.Tensor) -> torch.Tensor:
    """[N, B, c, H, W] -> [B, N*c, H, W] (a view when c == 1)."""
    return stacked.movedim(0, 1).flatten(1, 2)


def channels_to_stacked(x: torch.Tensor, world: int) -> torch.Tensor:
    """[B, N*c, H, W] -> [N, B, c, H, W]."""
    return x.unflatten(1, (world, x.shape[1] // world)).movedim(1, 0)


class _GatherChannels(Function):
    @staticmethod
    def forward(ctx, x, key):
        ctx.key, ctx.world = key, ops.world_size(key)
        return stacked_to_channels(ops.all_gather(x, key).unflatten(0, (ctx.world, x.shape[0])))

    @staticmethod
    def backward(ctx, grad):
        return ops.reduce_scatter(channels_to_stacked(grad, ctx.world), ctx.key), None


def gather_channels(x: torch.Tensor, group) -> torch.Tensor:
    """[B, c, H, W] on each rank -> [B, N*c, H, W], rank j's channels at block j."""
    key = ops.group_key(group)
    if ops.world_size(key) == 1:
        return x
    return _GatherChannels.apply(x, key)


class _PendingGather:
    """Carries an asynchronous all-gather (forward) and reduce-scatter (backward) between the
    two halves of ``start_gather_channels`` / ``PendingGather.wait``."""

    def __init__(self, group: ProcessGroup):
        self.group = group
        self.work = None
        self.grad = None
        self.batch = None

    @run_eagerly
    def wait(self, flat: torch.Tensor) -> torch.Tensor:
        return stacked_to_channels(_WaitGather.apply(flat, self))


class _StartGather(Function):
    @staticmethod
    def forward(ctx, x, pending):
        ctx.pending = pending
        # Return the buffer itself, not a view of it: the collective still writes into it, and
        # autograd forbids views whose base changes after a custom Function returned them.
        flat, pending.work = all_gather_flat_buffer(x, pending.group, async_op=True)
        pending.batch = x.shape[0]
        return flat

    @staticmethod
    def backward(ctx, grad):
        # The reduce-scatter was started by _WaitGather.backward; the local convolution's
        # backward ran in between (autograd runs the later-created node first).
        pending = ctx.pending
        pending.work.wait()
        out, pending.grad, pending.work = pending.grad, None, None
        return out, None


class _WaitGather(Function):
    @staticmethod
    def forward(ctx, flat, pending):
        ctx.pending = pending
        pending.work.wait()
        pending.work = None
        return flat.unflatten(0, (-1, pending.batch))

    @staticmethod
    def backward(ctx, grad):
        pending = ctx.pending
        pending.grad, pending.work = reduce_scatter_dim0(grad, pending.group, async_op=True)
        return grad.flatten(0, 1), None


@run_eagerly
def start_gather_channels(x: torch.Tensor, group: ProcessGroup):
    """Start gathering ``x`` [B, c, H, W] over ``group`` without waiting. Returns
    ``(buffer, pending)``; compute something else, then ``pending.wait(buffer)`` gives the
    same [B, N*c, H, W] as ``gather_channels``. Backward overlaps the reduce-scatter likewise."""
    pending = _PendingGather(group)
    return _StartGather.apply(x, pending), pending


class _SumOverRanks(Function):
    @staticmethod
    def forward(ctx, x, key):
        return ops.all_reduce(x, key)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_ranks(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (sum) whose backward is the identity."""
    key = ops.group_key(group)
    if ops.world_size(key) == 1:
        return x
    return _SumOverRanks.apply(x, key)


class _ExchangeChunks(Function):
    @staticmethod
    def forward(ctx, x, key):
        ctx.key = key
        return ops.all_to_all(x, key)

    @staticmethod
    def backward(ctx, grad):
        return ops.all_to_all(grad, ctx.key), None


def exchange_chunks(x: torch.Tensor, group) -> torch.Tensor:
    """All-to-all: chunk i of dim 0 goes to rank i; chunk i of the result came from rank i."""
    key = ops.group_key(group)
    if ops.world_size(key) == 1:
        return x
    return _ExchangeChunks.apply(x, key)
