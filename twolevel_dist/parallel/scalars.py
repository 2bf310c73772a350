"""Numbers the loop and the benchmarks add up (or take the maximum of) over ranks: losses,
counts, step times.

The tensor that travels lives on the ranks' device, like every other collective's: NCCL carries
CUDA tensors only, and even where gloo would take a CPU tensor beside it, the reduction should
not wait on a second backend."""

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def all_reduce_values(values, *, device: torch.device, group=None, op: str = "sum") -> torch.Tensor:
    """``values`` (numbers, or a tensor) as a float64 tensor on ``device``, reduced with ``op``
    over ``group``; no communication when ``group`` is None or has one rank. Read the result
    with ``.tolist()``."""
    total = torch.as_tensor(values, dtype=torch.float64).to(device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, op=OPS[op], group=group)
    return total
