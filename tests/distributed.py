"""Run a function on N gloo ranks (torch.multiprocessing, a free port), collecting each rank's
return value. Public torch API only."""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from coarse_init import use_random_coarse_operator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn, args, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    use_random_coarse_operator()           # as the parent's tests have it (coarse_init.py)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # Rank 0 hosts the TCP store: no rank may leave while another still needs it.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(world: int, fn, *args, backend: str = "gloo") -> list:
    """``fn(*args)`` on ``world`` freshly spawned ranks; returns the ranks' results in order.
    ``backend="cuda:gloo"`` serves CUDA tensors only: on one GPU it stands in for NCCL, under
    which a CPU tensor in a collective fails."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, free_port(), out_dir, fn, args, backend), nprocs=world,
                 join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world)]
