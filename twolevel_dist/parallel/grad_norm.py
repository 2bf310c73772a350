"""Gradient clipping by the global norm of a group-parallel model: the norm of the whole
single-device model's gradient, so that a sharded run clips exactly as one device does.

Each gp rank holds a disjoint slice of every sharded tensor, so their squared norms add up over
the gp group; a replicated tensor (the classifier's bias) has the same full gradient on every gp
rank and is counted once. The dp replicas need nothing: DDP has already averaged their
gradients, which are then the single-device gradient of the global batch on every replica.
Everything stays on the device (no host sync): the scale is a tensor.
"""

import torch

from twolevel_dist.parallel.parallelize import unwrap
from twolevel_dist.parallel.scalars import all_reduce_values
from twolevel_dist.parallel.state import tensor_shard_dims


def _sum_of_squares(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([g.double().square().sum() for g in grads]).sum()


def clip_grad_norm_(model: torch.nn.Module, max_norm: float, gp_group=None) -> torch.Tensor:
    """Scale every gradient of ``model`` (a shard, DDP-wrapped or not, or a whole model) by
    min(1, max_norm / (norm + 1e-6)), as ``torch.nn.utils.clip_grad_norm_``; returns the global
    norm before clipping (a float64 tensor on the device)."""
    model = unwrap(model)
    dims = tensor_shard_dims(model)
    # Every gp rank takes part in the reduction, even one with no gradient yet (nothing to
    # scale): the others would wait for it.
    named = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
    device = next(model.parameters()).device
    sharded = _sum_of_squares([g for name, g in named if dims.get(name) is not None], device)
    replicated = _sum_of_squares([g for name, g in named if dims.get(name) is None], device)
    norm = (all_reduce_values(sharded, device=device, group=gp_group) + replicated).sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    by_dtype = {}
    for _, g in named:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, grads in by_dtype.items():        # each dtype scaled in its own precision
        torch._foreach_mul_(grads, scale.to(dtype))
    return norm
