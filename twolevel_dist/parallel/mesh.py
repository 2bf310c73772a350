"""Process-group setup: the 2-D ("dp", "gp") device mesh, gp innermost.

Consecutive ranks form one model-parallel (gp) group, so a group stays inside one node; the dp
dimension runs across groups.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from twolevel_dist.errors import ConfigError


def init_distributed() -> torch.device:
    """Initialise torch.distributed from torchrun's environment if it is not already, and return
    this rank's device: NCCL on the local GPU when there is one, gloo on the CPU otherwise."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if v not in os.environ]
        if missing:
            raise ConfigError(
                f"torch.distributed is not initialised and {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set; launch with torchrun "
                f"(e.g. torchrun --standalone --nproc_per_node=4 ...)")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def init_mesh(groups: int, dp: int | None = None) -> DeviceMesh:
    """A ("dp", "gp") mesh with gp = ``groups`` ranks per model and dp = world // groups replicas."""
    if not dist.is_initialized():
        raise ConfigError("init_mesh needs torch.distributed initialised first; call "
                          "twolevel_dist.parallel.init_distributed() (under torchrun)")
    world = dist.get_world_size()
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(f"groups must be a positive integer, got {groups!r}")
    if world % groups:
        raise ConfigError(
            f"the world size {world} is not a multiple of groups={groups}: each model needs "
            f"{groups} ranks (one per group); launch a multiple of {groups} processes or set "
            f"groups to a divisor of {world}")
    if dp is None:
        dp = world // groups
    if dp * groups != world:
        raise ConfigError(f"dp x groups = {dp} x {groups} = {dp * groups} does not equal the "
                          f"world size {world}; leave dp unset to use world // groups")
    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (dp, groups), mesh_dim_names=("dp", "gp"))
