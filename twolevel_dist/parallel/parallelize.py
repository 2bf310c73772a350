"""``parallelize(model, mesh)``: a single-device network from ``build_model`` becomes this rank's
shard. Every module with parameters is replaced by its rule (``parallel.rules``); with dp > 1
the shard is wrapped in DDP over the dp dimension only, so gradients are averaged across replicas
and never cross the ranks of one model.
"""

import inspect

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel

from twolevel_dist.errors import ConfigError
from twolevel_dist.parallel.rules import SHARD_DIMS_ATTR, rule_for, shard_dims
from twolevel_dist.parallel.sharded import resolve_overlap


def _shard_tree(module: nn.Module, rank: int, world: int, group, overlap: bool, path: str = ""):
    for name, child in list(module.named_children()):
        child_path = f"{path}.{name}" if path else name
        rule = rule_for(child)
        if rule is not None:
            setattr(module, name, rule(child, rank, world, group, overlap))
        elif any(True for _ in child.parameters(recurse=False)) or \
                any(True for _ in child.buffers(recurse=False)):
            raise ConfigError(f"parallelize: no sharding rule for {child_path} "
                              f"({type(child).__name__}); add one to twolevel_dist.parallel.rules")
        else:
            _shard_tree(child, rank, world, group, overlap, child_path)


def parallelize(model: nn.Module, mesh: DeviceMesh, *, overlap: bool | None = None,
                device: torch.device | None = None, broadcast_buffers: bool = False) -> nn.Module:
    """Turn ``model`` (in place) into this rank's shard; wrap it in DDP over "dp" if dp > 1.

    The shard is built where the model lives (its device, dtype and memory format, ``meta``
    included); with ``device`` it is then moved there, so a large model can be sharded on the
    CPU and only its shard sent to the GPU (what ``train`` does).

    Input: the full batch of images (of this dp replica) on every rank of a gp group. Output: the
    full logits on every rank. ``overlap`` overlaps each GC-2L all-gather with the local filters;
    None chooses by device (``parallel.sharded.resolve_overlap``: on for CPUs, off for GPUs).
    BatchNorm running statistics stay per dp replica unless ``broadcast_buffers`` (DDP's per-step
    broadcast from replica 0); the training loop averages them over dp before evaluating."""
    if tuple(mesh.mesh_dim_names or ()) != ("dp", "gp"):
        raise ConfigError(f"parallelize needs a ('dp', 'gp') mesh from init_mesh, got dimensions "
                          f"{mesh.mesh_dim_names}")
    if isinstance(model, DistributedDataParallel):
        raise ConfigError("parallelize takes the single-device model from build_model, not a DDP "
                          "wrapper")
    gp_mesh, dp_mesh = mesh["gp"], mesh["dp"]
    # Where the shard will run decides GC-2L's path, not where it is built.
    target = device if device is not None else next(model.parameters()).device
    overlap = resolve_overlap(overlap, torch.device(target))
    if gp_mesh.size() > 1:
        _shard_tree(model, gp_mesh.get_local_rank(), gp_mesh.size(), gp_mesh.get_group(), overlap)
    for module in model.modules():
        setattr(module, SHARD_DIMS_ATTR, shard_dims(module) if gp_mesh.size() > 1 else {})
    if device is not None:
        model.to(device)
    if dp_mesh.size() > 1:
        model = data_parallel(model, dp_mesh.get_group(), broadcast_buffers=broadcast_buffers)
    return model


# torch 2.13 renamed DDP's per-forward buffer broadcast (the old name warns on every rank).
_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in
                inspect.signature(DistributedDataParallel.__init__).parameters
                else "broadcast_buffers")


def data_parallel(module: nn.Module, group, *, broadcast_buffers: bool = False):
    """``module`` wrapped in DDP over ``group``. The gradients are views into DDP's buckets
    (``gradient_as_bucket_view``): no second gradient-sized copy per replica, and the all-reduce
    writes them in place. ``broadcast_buffers``: DDP's broadcast of the buffers from replica 0
    before every forward (under the name this torch takes; at construction the replicas'
    buffers are the same either way)."""
    return DistributedDataParallel(module, process_group=group, gradient_as_bucket_view=True,
                                   **{_BUFFER_SYNC: broadcast_buffers})


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
