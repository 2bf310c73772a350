"""The synchronous collectives as PyTorch custom operators (``torch.library.custom_op``), so that
``torch.compile`` puts each one into its graph as one opaque call: no graph break at every layer
(which, inside blocks and ``nn.Sequential`` containers shared by many layers, recompiles a frame
for every block variant) and no tracing of ``torch.distributed`` calls inside autograd
Functions (which trained with zero gradients on torch 2.11). When called, an operator runs the
transport's eager code, so the counters count every call, compiled or not.

An operator cannot take a process group as an argument: it takes the group's key in this
process's registry (``group_key``), a plain int that the sharded modules hold. Every operator
returns a new tensor, contiguous, never a view of its input.
"""

import torch

from twolevel_dist.parallel import transport
from twolevel_dist.parallel.counters import record
from twolevel_dist.parallel.simulated import SimulatedGroup

_GROUPS: list = []          # key -> process group (or SimulatedGroup)
_SIZES: list[int] = []      # key -> its number of ranks


def group_key(group) -> int:
    """The key of ``group`` (registered at its first use); an int is taken as a key already."""
    if isinstance(group, int):
        return group
    for key, known in enumerate(_GROUPS):
        if known is group:
            return key
    _GROUPS.append(group)
    _SIZES.append(transport.group_size(group))
    return len(_GROUPS) - 1


def world_size(key: int) -> int:
    return _SIZES[key]


@torch.library.custom_op("twolevel::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, *s] -> [world * B, *s], rank j's tensor at rows j*B ..."""
    out, _ = transport.all_gather_flat_buffer(x, _GROUPS[group])
    return out


@all_gather.register_fake
def _(x, group):
    return x.new_empty((_SIZES[group] * x.shape[0], *x.shape[1:]))


@torch.library.custom_op("twolevel::reduce_scatter", mutates_args=())
def reduce_scatter(x: torch.Tensor, group: int) -> torch.Tensor:
    """[world, *s] -> [*s], summed over ranks: this rank's slot."""
    out, _ = transport.reduce_scatter_dim0(x, _GROUPS[group])
    return out


@reduce_scatter.register_fake
def _(x, group):
    return x.new_empty(x.shape[1:])


@torch.library.custom_op("twolevel::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group: int) -> torch.Tensor:
    """The sum over ranks."""
    out = x.clone(memory_format=torch.contiguous_format)
    record("all_reduce", out)
    group_ = _GROUPS[group]
    if not isinstance(group_, SimulatedGroup):
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group_)
    return out


@all_reduce.register_fake
def _(x, group):
    return x.new_empty(x.shape)


@torch.library.custom_op("twolevel::all_to_all", mutates_args=())
def all_to_all(x: torch.Tensor, group: int) -> torch.Tensor:
    """Chunk i of dim 0 goes to rank i; chunk i of the result came from rank i."""
    return transport.all_to_all_dim0(x, _GROUPS[group])


@all_to_all.register_fake
def _(x, group):
    return x.new_empty(x.shape)
