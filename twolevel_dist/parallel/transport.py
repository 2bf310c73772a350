"""How the collectives travel: the flat-buffer all-gather, reduce-scatter and all-to-all that
``collectives`` builds its autograd Functions on, with their asynchronous works, their
per-rank-simulation stand-ins (``SimulatedGroup``), and the transport setting: on gloo the
all-gathers and reduce-scatters travel as one all-to-all each (``set_transport``). Every call is
counted (``counters``). The process group is always passed explicitly; buffers are allocated on
the input's device."""

from __future__ import annotations

import torch
import torch.distributed as dist

from twolevel_dist.parallel.counters import record
from twolevel_dist.parallel.simulated import SimulatedGroup

ProcessGroup = dist.ProcessGroup

# torch 2.13 renamed the flat-tensor collectives (*_into_tensor / *_tensor -> *_single) and
# deprecated the old names; torch 2.11 has only the old ones. Both take dim-0-concatenated tensors.
# Looked up on torch.distributed at each call, so tools that wrap those functions see every call.
_ALL_GATHER = ("all_gather_single" if hasattr(dist, "all_gather_single")
               else "all_gather_into_tensor")
_REDUCE_SCATTER = ("reduce_scatter_single" if hasattr(dist, "reduce_scatter_single")
                   else "reduce_scatter_tensor")


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


# How all-gathers and reduce-scatters travel. "auto": as one all-to-all ("direct") on gloo, the
# backend's own collective ("native") elsewhere. On gloo one all-to-all moves GC-2L's small
# per-layer tensors more cheaply than gloo's own collectives (benchmarks/transport.py on 2 CPU
# ranks at 8-128 KB per rank, results/transport_N2_cpu.md: the reduce-scatter alone in about half
# the time, and while it overlaps compute the gloo threads, which share the ranks' cores, spend
# less than half the CPU time; the all-gather as much or less), moving the same bytes; NCCL's own
# collectives are what NVLink and InfiniBand are tuned for.
TRANSPORTS = ("auto", "direct", "native")
_DIRECT_BY_DEFAULT = ("gloo",)
_transport = "auto"


def set_transport(name: str) -> None:
    """Choose how this process's all-gathers and reduce-scatters travel (``TRANSPORTS``)."""
    global _transport
    if name not in TRANSPORTS:
        raise ValueError(f"transport {name!r} is not one of {TRANSPORTS}")
    _transport = name


def get_transport() -> str:
    return _transport


def _direct_exchange(group, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` travels as one all-to-all: always ("direct"), never ("native"), or
    ("auto") when the backend serving its device (the group's only backend, or the one named for
    that device in "cpu:gloo,cuda:nccl") is gloo."""
    if _transport != "auto":
        return _transport == "direct"
    config = str(dist.get_backend(group))
    by_device = dict(part.split(":") for part in config.split(",")) if ":" in config else {}
    return by_device.get(tensor.device.type, config) in _DIRECT_BY_DEFAULT


def _finish(work, then, async_op: bool, *buffers):
    """Run ``then`` now (synchronous) or hand back a work that runs it on ``wait``."""
    if async_op:
        return _ThenWork(work, then, *buffers)
    if then is not None:
        then()
    return None


def all_gather_flat_buffer(x: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """[B, *s] -> [world * B, *s] (rank j's tensor at rows j*B ...); returns (tensor, work)."""
    x = x.contiguous()
    world = group_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    record("all_gather", out)
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


def all_gather_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """[B, *s] -> [world, B, *s], stacked by group rank."""
    out, _ = all_gather_flat_buffer(x, group)
    return out.unflatten(0, (-1, x.shape[0]))


def reduce_scatter_dim0(x: torch.Tensor, group: ProcessGroup, async_op: bool = False):
    """[world, *s] -> [*s], summing over ranks; returns (tensor, work or None). Asynchronously,
    the tensor holds the result once the work's ``wait`` has returned."""
    x = x.contiguous()
    record("reduce_scatter", x)
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


def all_to_all_dim0(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    record("all_to_all", x)
    if isinstance(group, SimulatedGroup):
        return x.clone()                 # stand-in: the exchanged buffer, same shape and bytes
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out
