"""Move model state between the single-device layout and the per-rank shards.

``consolidate_state_dict`` gives, on every rank, the state dict that ``build_model(...)`` with the
same arguments loads with ``strict=True``; ``shard_state_dict`` is the reverse. Together they let a
checkpoint move between one device and N ranks. Parameters cross ranks only here, never per step.
``join_shards`` does what ``consolidate_state_dict`` does for shards read from files (a
checkpoint's rank files), in one process.
"""

import copy

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from twolevel_dist.parallel.parallelize import parallelize, unwrap
from twolevel_dist.parallel.rules import SHARD_DIMS_ATTR, shard_slice
from twolevel_dist.parallel.simulated import simulated_mesh


def tensor_shard_dims(model: nn.Module) -> dict[str, int | None]:
    """Fully qualified state-dict key -> the dimension it is split along (None: replicated)."""
    dims = {}
    for prefix, module in model.named_modules():
        module_dims = getattr(module, SHARD_DIMS_ATTR, {})
        for name, _ in list(module.named_parameters(recurse=False)) + \
                list(module.named_buffers(recurse=False)):
            dims[f"{prefix}.{name}" if prefix else name] = module_dims.get(name)
    return dims


def consolidate_state_dict(local_model: nn.Module, mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """The single-device state dict, assembled from every gp rank's shard (on every rank)."""
    model = unwrap(local_model)
    group, world = mesh["gp"].get_group(), mesh["gp"].size()
    dims = tensor_shard_dims(model)
    full = {}
    for key, tensor in model.state_dict().items():
        dim = dims.get(key)
        tensor = tensor.detach()
        if dim is None or world == 1:
            full[key] = tensor.clone()
            continue
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        full[key] = torch.cat(parts, dim=dim)
    return full


def shard_state_dict(full: dict[str, torch.Tensor], local_model: nn.Module,
                     mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """This rank's slice of a single-device state dict, loadable into ``local_model``."""
    model = unwrap(local_model)
    rank, world = mesh["gp"].get_local_rank(), mesh["gp"].size()
    dims = tensor_shard_dims(model)
    return {key: shard_slice(tensor, dims.get(key), rank, world).clone()
            for key, tensor in full.items()}


def join_shards(shards: list[dict[str, torch.Tensor]],
                model: nn.Module) -> dict[str, torch.Tensor]:
    """The single-device state dict from every gp rank's shard state dict, ``shards[j]`` rank
    j's (as its checkpoint file holds it), with no process group. ``model``: a single-device
    network of the same build, untouched (a copy of it is sharded over len(shards) simulated
    ranks to learn which tensors are split along which dimension; the number of classes does
    not change that, and one on ``meta`` does as well)."""
    if len(shards) == 1:
        return dict(shards[0])
    sharded = parallelize(copy.deepcopy(model), simulated_mesh(len(shards)))
    dims = tensor_shard_dims(sharded)
    return {key: tensor if dims.get(key) is None else
            torch.cat([shard[key] for shard in shards], dim=dims[key])
            for key, tensor in shards[0].items()}
