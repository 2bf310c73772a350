"""Autograd-aware collectives: every collective is a small autograd Function whose backward is
the matching collective (Megatron-LM's ``mappings.py`` pattern).

- ``gather_channels``   forward all-gather along the channel dim; backward reduce-scatter (sum),
                        because every rank's A0 rows read every rank's representative.
- ``sum_over_ranks``    forward all-reduce (sum); backward identity: every rank computes the same
                        loss from the same logits, so each already holds the full gradient.
- ``exchange_chunks``   forward all-to-all of equal chunks along dim 0; backward the same
                        all-to-all (it is its own adjoint in that layout).

On gloo the all-gathers and reduce-scatters travel as one all-to-all each (cheaper there for the
small per-layer tensors, ``DIRECT_EXCHANGE_BACKENDS``); other backends use their own collectives.

The process group is always passed explicitly; a size-1 group skips communication; buffers are
allocated on the input's device. A ``SimulatedGroup`` (``parallel.simulated``) makes every
collective a local stand-in of the same shape, for the per-rank simulation. Every call is
recorded in the active ``CommStats`` counters, so the training loop can log collectives and
bytes per step and the tests can count them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.autograd import Function

from twolevel_dist.layers.two_level import coarse_correction, coarse_weight_grad
from twolevel_dist.parallel.simulated import SimulatedGroup

ProcessGroup = dist.ProcessGroup

# torch 2.13 renamed the flat-tensor collectives (*_into_tensor / *_tensor -> *_single) and
# deprecated the old names; torch 2.11 has only the old ones. Both take dim-0-concatenated tensors.
# Looked up on torch.distributed at each call, so tools that wrap those functions see every call.
_ALL_GATHER = ("all_gather_single" if hasattr(dist, "all_gather_single")
               else "all_gather_into_tensor")
_REDUCE_SCATTER = ("reduce_scatter_single" if hasattr(dist, "reduce_scatter_single")
                   else "reduce_scatter_tensor")


@dataclass
class CommStats:
    """Collectives issued, by kind: number of calls and bytes of the full (gathered, reduced or
    exchanged) tensor, which is what the link carries per rank up to a factor (N-1)/N."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    shapes: dict[str, list[tuple[int, ...]]] = field(default_factory=lambda: defaultdict(list))

    def record(self, kind: str, tensor: torch.Tensor) -> None:
        self.calls[kind] += 1
        self.bytes[kind] += tensor.numel() * tensor.element_size()
        self.shapes[kind].append(tuple(tensor.shape))

    def total_calls(self) -> int:
        return sum(self.calls.values())

    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def as_dict(self) -> dict[str, int]:
        out = {f"{kind}_calls": n for kind, n in sorted(self.calls.items())}
        out.update({f"{kind}_bytes": n for kind, n in sorted(self.bytes.items())})
        return out


_active_counters: list[CommStats] = []


@contextlib.contextmanager
def count_collectives():
    """``with count_collectives() as stats:`` records every collective issued inside the block."""
    stats = CommStats()
    _active_counters.append(stats)
    try:
        yield stats
    finally:
        _active_counters.remove(stats)


def _record(kind: str, tensor: torch.Tensor) -> None:
    for stats in _active_counters:
        stats.record(kind, tensor)


def group_size(group) -> int:
    return group.size if isinstance(group, SimulatedGroup) else dist.get_world_size(group)


class _DoneWork:
    """What a simulated asynchronous collective returns: already complete."""

    def wait(self) -> bool:
        return True


class _ThenWork:
    """An asynchronous collective and what completes it locally once it has arrived (a sum);
    holds the buffers the collective reads until then."""

    def __init__(self, work, then=None, *buffers):
        self._work, self._then, self._buffers = work, then, buffers

    def wait(self) -> bool:
        self._work.wait()
        if self._then is not None:
            self._then()
        self._buffers = ()
        return True


# On gloo, one all-to-all moves GC-2L's small per-layer tensors more cheaply than gloo's own
# collectives: measured by benchmarks/transport.py on 2 CPU ranks at 8-128 KB per rank
# (results/transport_N2_cpu.md), the reduce-scatter takes 0.26-0.62 ms alone against 0.74-1.43 ms,
# and while it overlaps compute the gloo threads, which share the ranks' cores, spend less than half
# the CPU time; the all-gather costs as much or less. Both therefore travel as one direct exchange
# there, moving the same bytes; NCCL and other backends use their own collectives.
DIRECT_EXCHANGE_BACKENDS = ("gloo",)


def _direct_exchange(group, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` travels as one all-to-all: when the backend serving its device (the
    group's only backend, or the one named for that device in "cpu:gloo,cuda:nccl") is listed."""
    config = str(dist.get_backend(group))
    by_device = dict(part.split(":") for part in config.split(",")) if ":" in config else {}
    return by_device.get(tensor.device.type, config) in DIRECT_EXCHANGE_BACKENDS


def _finish(work, then, async_op: bool, *buffers):
    """Run ``then`` now (synchronous) or hand back a work that runs it on ``wait``."""
    if async_op:
        return _ThenWork(work, then, *buffers)
    if then is not None:
        then()
    return None


def _all_gather_flat_buffer(x: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """[B, *s] -> [world * B, *s] (rank j's tensor at rows j*B ...); returns (tensor, work)."""
    x = x.contiguous()
    world = group_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _record("all_gather", out)
    if isinstance(group, SimulatedGroup):
        # Stand-in: every rank's slot holds this rank's tensor (same shape, same bytes written).
        out.view((world,) + tuple(x.shape)).copy_(x.unsqueeze(0).expand((world,) + tuple(x.shape)))
        return out, _DoneWork() if async_op else None
    if _direct_exchange(group, x):
        # Every rank sends its tensor to every rank: chunk j of the result came from rank j.
        copies = x.unsqueeze(0).expand((world,) + tuple(x.shape)).flatten(0, 1).contiguous()
        work = dist.all_to_all_single(out, copies, group=group, async_op=async_op)
        return out, _finish(work, None, async_op, copies)
    work = getattr(dist, _ALL_GATHER)(out, x, group=group, async_op=async_op)
    return out, work


def _all_gather_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[B, *s] -> [world, B, *s], stacked by group rank."""
    out, _ = _all_gather_flat_buffer(x, group)
    return out.unflatten(0, (-1, x.shape[0]))


def _reduce_scatter_dim0(x: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """[world, *s] -> [*s], summing over ranks; returns (tensor, work or None). Asynchronously,
    the tensor holds the result once the work's ``wait`` has returned."""
    x = x.contiguous()
    _record("reduce_scatter", x)
    if isinstance(group, SimulatedGroup):
        out = x.sum(0)                   # stand-in: the sum over ranks of this rank's slots
        return out, _DoneWork() if async_op else None
    out = torch.empty(tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if _direct_exchange(group, x):
        # Slot j goes to rank j; what arrives (every rank's slot for this one) is summed here.
        received = torch.empty_like(x)
        work = dist.all_to_all_single(received, x, group=group, async_op=async_op)
        return out, _finish(work, lambda: torch.sum(received, 0, out=out), async_op, x)
    work = getattr(dist, _REDUCE_SCATTER)(out, x.flatten(0, 1), op=dist.ReduceOp.SUM,
                                          group=group, async_op=async_op)
    return out, work


def _stacked_to_channels(stacked: torch.Tensor) -> torch.Tensor:
    """[N, B, c, H, W] -> [B, N*c, H, W] (a view when c == 1)."""
    return stacked.movedim(0, 1).flatten(1, 2)


def _channels_to_stacked(x: torch.Tensor, world: int) -> torch.Tensor:
    """[B, N*c, H, W] -> [N, B, c, H, W]."""
    return x.unflatten(1, (world, x.shape[1] // world)).movedim(1, 0)


class _GatherChannels(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _stacked_to_channels(_all_gather_dim0(x, group))

    @staticmethod
    def backward(ctx, grad):
        world = group_size(ctx.group)
        out, _ = _reduce_scatter_dim0(_channels_to_stacked(grad, world), ctx.group)
        return out, None


def gather_channels(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[B, c, H, W] on each rank -> [B, N*c, H, W], rank j's channels at block j."""
    if group_size(group) == 1:
        return x
    return _GatherChannels.apply(x, group)


class _PendingGather:
    """Carries an asynchronous all-gather (forward) and reduce-scatter (backward) between the
    two halves of ``start_gather_channels`` / ``PendingGather.wait``."""

    def __init__(self, group: ProcessGroup):
        self.group = group
        self.work = None
        self.grad = None
        self.batch = None

    def wait(self, flat: torch.Tensor) -> torch.Tensor:
        return _stacked_to_channels(_WaitGather.apply(flat, self))


class _StartGather(Function):
    @staticmethod
    def forward(ctx, x, pending):
        ctx.pending = pending
        # Return the buffer itself, not a view of it: the collective still writes into it, and
        # autograd forbids views whose base changes after a custom Function returned them.
        flat, pending.work = _all_gather_flat_buffer(x, pending.group, async_op=True)
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
        pending.grad, pending.work = _reduce_scatter_dim0(grad, pending.group, async_op=True)
        return grad.flatten(0, 1), None


def start_gather_channels(x: torch.Tensor, group: ProcessGroup):
    """Start gathering ``x`` [B, c, H, W] over ``group`` without waiting. Returns
    ``(buffer, pending)``; compute something else, then ``pending.wait(buffer)`` gives the
    same [B, N*c, H, W] as ``gather_channels``. Backward overlaps the reduce-scatter likewise."""
    pending = _PendingGather(group)
    return _StartGather.apply(x, pending), pending


class _CoarseExchange(Function):
    """GC-2L's exchange on one rank, on the fused convolution's output [B, C_out/N + 1, H, W]:
    all-gather the last channel (the representative) over the group, apply this rank's rows of A0
    ([C_out/N, N]) and add them to the other channels. One Function, so that backward builds the
    fused gradient with one concatenation instead of autograd's zero-filled slice gradients."""

    @staticmethod
    def forward(ctx, fused, coarse_weight, group):
        local_out = fused.shape[1] - 1
        # A contiguous copy (B x N x H x W, small): what the bmm wants, and not a view of the
        # gather buffer, which torch.compile refuses to save for backward.
        representatives = _stacked_to_channels(_all_gather_dim0(fused[:, local_out:], group)) \
            .clone(memory_format=torch.contiguous_format)
        ctx.save_for_backward(coarse_weight, representatives)
        ctx.group = group
        return coarse_correction(coarse_weight, representatives).add_(fused[:, :local_out])

    @staticmethod
    def backward(ctx, grad):
        # Under autocast the forward ran in the gradient's (lower) precision; A0 is stored in
        # float32 and gets its gradient in float32.
        coarse_weight, representatives = ctx.saved_tensors
        grad_coarse = coarse_weight_grad(grad, representatives).to(coarse_weight.dtype)
        grad_representatives = coarse_correction(coarse_weight.t().to(grad.dtype), grad)
        world = group_size(ctx.group)
        own, _ = _reduce_scatter_dim0(_channels_to_stacked(grad_representatives, world), ctx.group)
        return torch.cat([grad, own.to(grad.dtype)], dim=1), grad_coarse, None


def coarse_exchange(fused: torch.Tensor, coarse_weight: torch.Tensor, group) -> torch.Tensor:
    """local + A0 (all-gathered representatives), from the fused output [B, C_out/N + 1, H, W]."""
    if group_size(group) == 1:
        local_out = fused.shape[1] - 1
        return fused[:, :local_out] + coarse_correction(coarse_weight, fused[:, local_out:])
    return _CoarseExchange.apply(fused, coarse_weight, group)


class _SumOverRanks(Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone(memory_format=torch.contiguous_format)
        _record("all_reduce", out)
        if not isinstance(group, SimulatedGroup):
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_ranks(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-reduce (sum) whose backward is the identity."""
    if group_size(group) == 1:
        return x
    return _SumOverRanks.apply(x, group)


def _all_to_all_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    _record("all_to_all", x)
    if isinstance(group, SimulatedGroup):
        return x.clone()                 # stand-in: the exchanged buffer, same shape and bytes
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


class _ExchangeChunks(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_dim0(grad, ctx.group), None


def exchange_chunks(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """All-to-all: chunk i of dim 0 goes to rank i; chunk i of the result came from rank i."""
    if group_size(group) == 1:
        return x
    return _ExchangeChunks.apply(x, group)
