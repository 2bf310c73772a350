"""Ranks agreeing on what happened on each: one ``all_gather_object`` of a small Python value
(None where all went well, else a problem's text), so that every rank takes the same branch
afterwards and none goes on to a collective the others never reach.

Objects travel through the default process group's device (NCCL: the current CUDA device,
which ``init_distributed`` sets); these run a few times per job, never per step."""

import torch.distributed as dist


def gather_from_every_rank(value, group=None) -> list:
    """``value`` of every rank of ``group`` (default: the world), in rank order; ``[value]``
    without a process group."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [value]
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def raise_first(problem, error_type, group=None) -> None:
    """Raise ``error_type`` on every rank with the first rank's problem, if any rank has one."""
    problems = [p for p in gather_from_every_rank(problem, group) if p is not None]
    if problems:
        raise error_type(problems[0])
